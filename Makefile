# rlhf: make demo (install + the whole pipeline on the embedded default), make test.
PYTHON ?= python3
VENV ?= .venv
# CPU wheel on this machine; on a CUDA box: make install TORCH_SPEC='torch>=2.4'
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
RUNS ?= runs

.PHONY: install demo test test-slow bench clean help

help:
	@echo "make demo    install, then sft -> train-rm -> rl on the embedded default (CPU, minutes)"
	@echo "make test    install, then the test suite (slow tests: make test-slow)"
	@echo "make bench   throughput benchmark"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/python scripts/demo.py --runs $(RUNS)

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(RUNS) outputs multirun .pytest_cache
