"""`rlhf label judge=human`: a labeling page served on 127.0.0.1 by the standard library alone.

    rlhf label input=gens.jsonl judge=human output=prefs.jsonl port=8765 labeler=ana
    # then open http://127.0.0.1:8765 (another labeler: http://127.0.0.1:8765/?labeler=ben)

The page shows a prompt and two responses side by side; a click or a key (A, B,
T = tie, S = skip) records the choice. Each choice is appended to a file and
flushed to disk (fsync) the moment it is made, so a closed tab or a killed
server loses nothing: the files are the only state, and a reload (or a rerun)
shows the labeler's first pair without a choice of theirs. Decisive choices go
to `output` as prompt/chosen/rejected rows (what train-rm reads) with `labeler`
and `pair_id`; ties and skips go to OUTPUT.undecided.jsonl. Labelers share the
files (appends under an exclusive lock, never a rewrite); each labeler sees
their own progress. No internet, no JavaScript framework: one page, plain
`fetch` calls to /api/next and /api/choice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from rlhf_cli.errors import UserError
from rlhf_cli.training.tracking import console

CHOICES = ("A", "B", "tie", "skip")


def undecided_path(output: Path) -> Path:
    return output.with_name(output.name + ".undecided.jsonl")


def pair_items(rows: list[dict], pairs: str) -> list[dict]:
    """What the page shows, in order: per prompt responses 0 and 1 (best_worst) or every i < j (all)."""
    items = []
    for r, row in enumerate(rows):
        n = len(row["responses"])
        ij = [(0, 1)] if pairs == "best_worst" else [(i, j) for i in range(n) for j in range(i + 1, n)]
        other = {k: v for k, v in row.items() if k not in ("prompt", "responses", "chosen", "rejected", "margin")}
        for i, j in ij:
            items.append({"pair_id": f"{r}:{i}-{j}", "prompt": row["prompt"], "a": row["responses"][i],
                          "b": row["responses"][j], "other": other})
    return items


class Labels:
    """The choice files: appended under an exclusive lock, read back to know what each labeler has done."""

    def __init__(self, output: Path, items: list[dict]):
        self.output, self.undecided = output, undecided_path(output)
        self.items = items
        self.by_id = {item["pair_id"]: item for item in items}
        self.lock = threading.Lock()
        for path in (self.output, self.undecided):
            for row in self._read(path):
                if "pair_id" not in row or "labeler" not in row:
                    raise UserError(f"output: {path} holds rows without pair_id/labeler: it was not written by "
                                    f"`rlhf label judge=human`; choose another output=...")

    @staticmethod
    def _read(path: Path) -> list[dict]:
        if not path.exists():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line torn by a kill mid-write: that choice was never confirmed to the page
                continue
        return rows

    def done(self, labeler: str) -> set[str]:
        return {r["pair_id"] for path in (self.output, self.undecided) for r in self._read(path)
                if r.get("labeler") == labeler}

    def next(self, labeler: str) -> dict:
        done = self.done(labeler)
        labeled = sum(1 for item in self.items if item["pair_id"] in done)
        state = {"labeler": labeler, "labeled": labeled, "total": len(self.items)}
        pending = next((item for item in self.items if item["pair_id"] not in done), None)
        if pending is None:
            return {**state, "done": True}
        return {**state, "done": False, "pair_id": pending["pair_id"], "prompt": pending["prompt"],
                "a": pending["a"], "b": pending["b"]}

    def record(self, labeler: str, pair_id: str, choice: str) -> None:
        item = self.by_id.get(pair_id)
        if item is None or choice not in CHOICES or not labeler:
            raise ValueError(f"unknown pair {pair_id!r} or choice {choice!r} (one of {', '.join(CHOICES)})")
        with self.lock:
            if pair_id in self.done(labeler):  # a double click: the first choice stands
                return
            if choice in ("A", "B"):
                chosen, rejected = (item["a"], item["b"]) if choice == "A" else (item["b"], item["a"])
                path, row = self.output, {"prompt": item["prompt"], "chosen": chosen, "rejected": rejected}
            else:
                path, row = self.undecided, {"prompt": item["prompt"], "response_a": item["a"],
                                             "response_b": item["b"], "verdict": choice}
            row = {**row, "labeler": labeler, "pair_id": pair_id, **item["other"]}
            append_line(path, row)


def append_line(path: Path, row: dict) -> None:
    """One line appended under an exclusive lock (other servers on the same files wait) and fsync'd."""
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_handler(labels: Labels, default_labeler: str):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # one line per choice is printed instead
            pass

        def _labeler(self) -> str:
            return parse_qs(urlparse(self.path).query).get("labeler", [default_labeler])[0].strip() or default_labeler

        def _send(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj: dict, code: int = 200) -> None:
            self._send(code, json.dumps(obj).encode(), "application/json")

        def do_GET(self) -> None:
            route = urlparse(self.path).path
            if route == "/":
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif route == "/api/next":
                self._json(labels.next(self._labeler()))
            else:
                self._send(404, b"not found", "text/plain")

        def do_POST(self) -> None:
            if urlparse(self.path).path != "/api/choice":
                self._send(404, b"not found", "text/plain")
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                labeler = str(body.get("labeler") or default_labeler)
                labels.record(labeler, str(body.get("pair_id")), str(body.get("choice")))
            except ValueError as e:
                self._json({"error": str(e)}, 400)
                return
            console.print(f"  {labeler}: {body['pair_id']} -> {body['choice']}", markup=False)
            self._json(labels.next(labeler))

    return Handler


def serve(rows: list[dict], output: Path, pairs: str, port: int, labeler: str) -> None:
    """Serve the page until Ctrl-C / SIGTERM; every choice is on disk before the page shows the next pair."""
    labels = Labels(output, pair_items(rows, pairs))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(labels, labeler))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on 127.0.0.1 is in use (another `rlhf label` page?); choose another "
                            f"port=..., e.g. port={port + 1}") from None
        raise UserError(f"cannot serve on 127.0.0.1:{port}: {e.strerror}; choose another port=...") from None
    state = labels.next(labeler)
    console.print(f"labeling page: http://127.0.0.1:{port}/  ({state['total']} pairs; {labeler} has labeled "
                  f"{state['labeled']}; another labeler: http://127.0.0.1:{port}/?labeler=NAME)", markup=False,
                  soft_wrap=True)
    console.print(f"choices go to {output} (ties and skips to {undecided_path(output).name}); Ctrl-C stops, "
                  f"a rerun continues", markup=False, soft_wrap=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print(f"stopped; every choice made is in {output}; rerun the same command to continue", markup=False,
                      soft_wrap=True)
    finally:
        server.server_close()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rlhf label</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
 header { display: flex; justify-content: space-between; align-items: baseline; }
 #progress { font-weight: bold; }
 pre { white-space: pre-wrap; word-wrap: break-word; margin: 0; font-family: ui-monospace, monospace; }
 #prompt { background: #eef; padding: .8em; border-radius: 6px; margin: 1em 0; }
 .pair { display: flex; gap: 1em; }
 .side { flex: 1; background: #fff; border: 2px solid #ccc; border-radius: 6px; padding: .8em; cursor: pointer; }
 .side:hover { border-color: #36c; }
 .side h2 { font-size: 1em; margin: 0 0 .5em 0; }
 nav { margin-top: 1em; display: flex; gap: .6em; }
 button { font-size: 1em; padding: .4em 1em; }
 #done { display: none; font-size: 1.2em; margin-top: 2em; }
</style></head>
<body>
<header><h1>Which response is better?</h1>
 <span>labeler <b id="labeler"></b> &middot; <span id="progress"></span></span></header>
<main id="task">
 <pre id="prompt"></pre>
 <div class="pair">
  <div class="side" id="side-a" data-choice="A"><h2>A</h2><pre id="a"></pre></div>
  <div class="side" id="side-b" data-choice="B"><h2>B</h2><pre id="b"></pre></div>
 </div>
 <nav>
  <button id="choose-a" data-choice="A">A is better (A)</button>
  <button id="choose-b" data-choice="B">B is better (B)</button>
  <button id="choose-tie" data-choice="tie">Tie (T)</button>
  <button id="choose-skip" data-choice="skip">Skip (S)</button>
 </nav>
</main>
<p id="done">All pairs are labeled. Thank you: every choice is saved.</p>
<script>
const params = new URLSearchParams(location.search);
let current = null, busy = false;
function show(state) {
  current = state;
  document.getElementById("labeler").textContent = state.labeler;
  document.getElementById("progress").textContent = state.labeled + " / " + state.total + " labeled";
  document.getElementById("task").style.display = state.done ? "none" : "block";
  document.getElementById("done").style.display = state.done ? "block" : "none";
  if (state.done) return;
  document.getElementById("prompt").textContent = state.prompt;
  document.getElementById("a").textContent = state.a;
  document.getElementById("b").textContent = state.b;
  document.body.dataset.pair = state.pair_id;
}
async function load() {
  const q = params.get("labeler") ? "?labeler=" + encodeURIComponent(params.get("labeler")) : "";
  show(await (await fetch("/api/next" + q)).json());
}
async function choose(choice) {
  if (busy || !current || current.done) return;
  busy = true;
  if (document.activeElement) document.activeElement.blur();  // Enter must not repeat a click on the next pair
  try {
    const r = await fetch("/api/choice", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({labeler: current.labeler, pair_id: current.pair_id, choice: choice})});
    show(await r.json());
  } finally { busy = false; }
}
document.querySelectorAll("[data-choice]").forEach(el =>
  el.addEventListener("click", () => choose(el.dataset.choice)));
document.addEventListener("keydown", e => {
  const key = {a: "A", b: "B", t: "tie", s: "skip"}[e.key.toLowerCase()];
  if (key && !e.ctrlKey && !e.metaKey && !e.altKey) { e.preventDefault(); choose(key); }
});
load();
</script>
</body></html>
"""
