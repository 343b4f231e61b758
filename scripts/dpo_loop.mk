# Iterated (online) DPO as a Makefile with rounds (docs/dpo.md): stages and tools talk only through paths.
#
#     make -f scripts/dpo_loop.mk all report         # the embedded task, 3 rounds, CPU; then the table per round
#     make -f scripts/dpo_loop.mk ROUNDS=3 DEV="device=cuda" RLHF=.venv/bin/rlhf
#     make -f scripts/dpo_loop.mk JUDGE=rm REWARD_MODEL=runs/rm/final   # label by a reward model, not the rule
#     make -f scripts/dpo_loop.mk PAIRS=p.jsonl EVAL=held.jsonl GEN_ARGS=data.prompts=prompts.jsonl   # your data
#     make -n -f scripts/dpo_loop.mk                  # print the commands only
#
# round 0: sft -> dpo0 on the given pairs (PAIRS=file.jsonl, or the embedded task's)
# round k: generate SAMPLES responses per prompt from dpo{k-1} -> label them (JUDGE=rule: the rule's scores;
#          JUDGE=rm: the reward model REWARD_MODEL), best against worst of each prompt -> dpo{k} from dpo{k-1} on those
#          pairs alone, its reference dpo{k-1} (each round's reference is the policy that sampled its pairs)
# make -f scripts/dpo_loop.mk report: held-out accuracy and pairs ranked right per round (RUNS/report.md)

RLHF ?= rlhf
PYTHON ?= $(if $(findstring /,$(RLHF)),$(dir $(RLHF))python,python3)
RUNS ?= runs/dpo-loop
ROUNDS ?= 3
DEV ?= device=cpu
JUDGE ?= rule
RULE ?= rlhf_cli.task:correctness_reward
REWARD_MODEL ?=
SAMPLES ?= 4
PAIRS ?=
EVAL ?= $(RUNS)/pairs_eval.jsonl
SFT_ARGS ?=
DPO_ARGS ?=
GEN_ARGS ?= data.num_prompts=2000 max_new_tokens=100

JUDGE_ARGS := $(if $(filter rm,$(JUDGE)),judge=rm reward.model.path=$(REWARD_MODEL),judge=rule reward.functions=[$(RULE)])
ifeq ($(JUDGE),rm)
ifeq ($(REWARD_MODEL),)
$(error JUDGE=rm needs REWARD_MODEL=<a train-rm final/>, e.g. REWARD_MODEL=runs/rm/final)
endif
endif

.PHONY: all
all: $(RUNS)/dpo$(ROUNDS)/final/manifest.json

$(RUNS)/sft/final/manifest.json:
	$(RLHF) sft output_dir=$(RUNS)/sft $(DEV) $(SFT_ARGS)

# every round is measured on the same held-out pairs and their prompts: by default the embedded task's held-out split
$(RUNS)/pairs_eval.jsonl:
	mkdir -p $(RUNS)
	$(PYTHON) -c "import json; from rlhf_cli import task; print(*(json.dumps(r) for r in task.preference_rows(200, split='eval')), sep='\n')" > $@.tmp
	mv $@.tmp $@

$(RUNS)/dpo0/final/manifest.json: $(RUNS)/sft/final/manifest.json $(EVAL)
	$(RLHF) dpo model.path=$(RUNS)/sft/final output_dir=$(RUNS)/dpo0 $(if $(PAIRS),data.train=$(PAIRS)) data.eval=$(EVAL) \
		$(DEV) $(DPO_ARGS)

# one round: $(1) = this round, $(2) = the one before
define ROUND
$(RUNS)/gens$(1).jsonl: $(RUNS)/dpo$(2)/final/manifest.json
	$(RLHF) generate model.path=$(RUNS)/dpo$(2)/final samples_per_prompt=$(SAMPLES) seed=$(1) \
		output=$(RUNS)/gens$(1).jsonl $(DEV) $(GEN_ARGS)

$(RUNS)/pairs$(1).jsonl: $(RUNS)/gens$(1).jsonl
	$(RLHF) label input=$(RUNS)/gens$(1).jsonl $(JUDGE_ARGS) pairs=best_worst output=$(RUNS)/pairs$(1).jsonl $(DEV)

$(RUNS)/dpo$(1)/final/manifest.json: $(RUNS)/pairs$(1).jsonl
	$(RLHF) dpo model.path=$(RUNS)/dpo$(2)/final data.train=$(RUNS)/pairs$(1).jsonl data.eval=$(EVAL) \
		output_dir=$(RUNS)/dpo$(1) $(DEV) $(DPO_ARGS)
endef

$(foreach r,$(shell seq 1 $(ROUNDS)),$(eval $(call ROUND,$(r),$(shell expr $(r) - 1))))

.PHONY: report
report: $(RUNS)/dpo$(ROUNDS)/final/manifest.json
	$(PYTHON) -c "import json, sys; runs = sys.argv[1]; \
rows = [('sft', json.load(open(f'{runs}/sft/final/manifest.json')))] + \
       [(f'dpo{k}', json.load(open(f'{runs}/dpo{k}/final/manifest.json'))) for k in range($(ROUNDS) + 1)]; \
lines = ['| run | held-out accuracy (eval.rule) | held-out pairs ranked right | training pairs |', '|---|---|---|---|'] + \
        [f\"| {n} | {m['metrics'].get('eval_accuracy', float('nan')):.1%} | \" + \
         (f\"{m['metrics']['eval_pair_accuracy']:.1%} | {m['pairs']['train']} |\" if 'pairs' in m else '| |') for n, m in rows]; \
open(f'{runs}/report.md', 'w').write('\n'.join(lines) + '\n'); print('\n'.join(lines))" $(RUNS)
