"""`rlhf label judge=human`: the labeling page in a real headless browser (Chromium driven by Selenium).

    .venv/bin/pip install -e '.[browser]'; apt-get install -y chromium chromium-driver
    .venv/bin/pytest -q tests/cli/test_label_page.py

Choices by click and by key land in the file at once, a reload resumes at the first unlabeled
pair, a killed server loses no choice and its rerun continues, and two labelers share the files
without overwriting each other. Without Selenium or Chromium the browser test skips, saying which.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli
from helpers import write_jsonl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ROWS = [{"prompt": f"Start at {i}. add 1.\n", "responses": [f"first answer {i}", f"second answer {i}"],
         "answer": str(i + 1)} for i in range(3)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_page(tmp_path: Path, port: int, *extra: str) -> subprocess.Popen:
    """`rlhf label judge=human` as a user starts it; returns once the page answers."""
    gens = write_jsonl(tmp_path / "gens.jsonl", ROWS)
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_cli", "label", f"input={gens}", "judge=human",
                             f"output={tmp_path / 'prefs.jsonl'}", f"port={port}", "labeler=ana", *extra],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RLHF_NO_PROGRESS": "1"})
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    raise AssertionError("the labeling page did not start")


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        gens = write_jsonl(tmp_path / "gens.jsonl", ROWS)
        proc = run_cli("label", f"input={gens}", "judge=human", f"output={tmp_path / 'p.jsonl'}", f"port={port}",
                       cwd=tmp_path)
    assert_one_line_error(proc, f"port {port} on 127.0.0.1 is in use")
    assert not (tmp_path / "p.jsonl").exists()


@pytest.fixture
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[browser]'")
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("Chromium and its driver are not installed: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_label_page_in_a_real_browser(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    out, undecided = tmp_path / "prefs.jsonl", tmp_path / "prefs.jsonl.undecided.jsonl"

    def showing(prompt_index: int, progress: str) -> None:
        WebDriverWait(browser, 10).until(
            lambda d: d.find_element(By.ID, "prompt").text.strip() == ROWS[prompt_index]["prompt"].strip()
            and d.find_element(By.ID, "progress").text == progress)

    server = start_page(tmp_path, port)
    try:
        browser.get(url)
        showing(0, "0 / 3 labeled")
        assert browser.find_element(By.ID, "a").text == "first answer 0"
        browser.find_element(By.ID, "side-b").click()  # a click on response B
        showing(1, "1 / 3 labeled")
        assert rows_of(out) == [{"prompt": ROWS[0]["prompt"], "chosen": "second answer 0", "rejected": "first answer 0",
                                 "labeler": "ana", "pair_id": "0:0-1", "answer": "1"}]  # on disk before the next pair
        browser.find_element(By.TAG_NAME, "body").send_keys("a")  # the A key
        showing(2, "2 / 3 labeled")
        assert [r["chosen"] for r in rows_of(out)] == ["second answer 0", "first answer 1"]
        browser.refresh()  # a reload resumes at the first unlabeled pair
        showing(2, "2 / 3 labeled")
        os.makedirs(tmp_path / "shots", exist_ok=True)
        browser.save_screenshot(str(tmp_path / "shots" / "label_page.png"))
    finally:
        server.send_signal(signal.SIGKILL)  # killed mid-labeling: every recorded choice is already on disk
        server.wait()
    assert len(rows_of(out)) == 2

    server = start_page(tmp_path, port)  # the rerun continues where ana stopped
    try:
        browser.refresh()
        showing(2, "2 / 3 labeled")
        browser.get(url + "?labeler=ben")  # a second labeler on the same files starts at the beginning
        showing(0, "0 / 3 labeled")
        assert browser.find_element(By.ID, "labeler").text == "ben"
        browser.find_element(By.TAG_NAME, "body").send_keys("t")  # tie
        showing(1, "1 / 3 labeled")
        browser.find_element(By.ID, "choose-skip").click()
        showing(2, "2 / 3 labeled")
        browser.find_element(By.TAG_NAME, "body").send_keys("b")
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "done").is_displayed())
        browser.get(url)  # ana still has her one pair left
        showing(2, "2 / 3 labeled")
        browser.find_element(By.ID, "choose-a").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "done").is_displayed())
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    decided = rows_of(out)
    assert [(r["labeler"], r["pair_id"], r["chosen"]) for r in decided] == [
        ("ana", "0:0-1", "second answer 0"), ("ana", "1:0-1", "first answer 1"), ("ben", "2:0-1", "second answer 2"),
        ("ana", "2:0-1", "first answer 2")]  # appended in the order made; nobody's choice overwritten
    assert [(r["labeler"], r["pair_id"], r["verdict"]) for r in rows_of(undecided)] == [
        ("ben", "0:0-1", "tie"), ("ben", "1:0-1", "skip")]
