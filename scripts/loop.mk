# The RLHF loop as a Makefile with rounds (docs/loop.md): stages and tools talk only through paths.
#
#     make -f scripts/loop.mk all report            # the embedded task, 3 rounds, CPU; then the table per round
#     make -f scripts/loop.mk ROUNDS=3 DEV="device=cuda" RLHF=.venv/bin/rlhf
#     make -n -f scripts/loop.mk                    # print the commands only
#
# round 0: sft -> reward model on the given pairs -> RL against that reward model alone
# round k: generate from RL policy k-1 -> label by the rule, keeping the pairs RM k-1 gets wrong (mine=disagree)
#          -> retrain the RM from RM k-1 (its head kept) on every round's pairs so far -> RL again, from RL policy k-1
#          with the KL still to the sft policy (RL_FROM=previous, the online loop; RL_FROM=sft starts each round anew)
# make -f scripts/loop.mk report: the table per round (held-out accuracy; the RM's accuracy on the policy's samples)
# Every retraining sees the original pairs beside each round's: PAIRS=file.jsonl (yours), or by default the
# embedded task's 32,000 pairs written to $(RUNS)/pairs0.jsonl (a first run without them trained rm1 on the
# 148 mined pairs alone and its RL policy fell from 100% to 41% held-out: docs/loop.md).

RLHF ?= rlhf
PYTHON ?= $(if $(findstring /,$(RLHF)),$(dir $(RLHF))python,python3)
RUNS ?= runs/loop
ROUNDS ?= 3
DEV ?= device=cpu
RULE ?= rlhf_cli.task:correctness_reward
SAMPLES ?= 4
PAIRS ?=
MINED_COPIES ?= 8
RL_FROM ?= previous
SFT_ARGS ?=
RM_ARGS ?=
# the README's reward-hacking case: against one RM alone this setting rises to 73% in 50 steps and falls to 35.5% at
# 150 (docs/loop.md); each round runs 50 steps, continuing the last round's policy against a retrained RM. (The stage
# defaults, rloo baseline and kl.coef 0.2 with an RM, do not collapse on the embedded task.)
RL_ARGS ?= algorithm=reinforce algorithm.baseline=group_norm kl.coef=0.05 max_steps=50
GEN_ARGS ?= data.num_prompts=2000
HELD_ARGS ?= data.split=eval

comma := ,
empty :=
space := $(empty) $(empty)

.PHONY: all
all: $(RUNS)/rl$(ROUNDS)/final/manifest.json

ORIGINAL := $(if $(PAIRS),$(PAIRS),$(RUNS)/pairs0.jsonl)

$(RUNS)/pairs0.jsonl:
	mkdir -p $(RUNS)
	$(PYTHON) -c "import json; from rlhf_cli import task; print(*(json.dumps(r) for r in task.preference_rows(32000, seed=0)), sep='\n')" > $@.tmp
	mv $@.tmp $@

$(RUNS)/sft/final/manifest.json:
	$(RLHF) sft output_dir=$(RUNS)/sft $(DEV) $(SFT_ARGS)

$(RUNS)/rm0/final/manifest.json: $(RUNS)/sft/final/manifest.json
	$(RLHF) train-rm model.path=$(RUNS)/sft/final output_dir=$(RUNS)/rm0 $(if $(PAIRS),data.train=$(PAIRS)) $(DEV) $(RM_ARGS)

$(RUNS)/rl0/final/manifest.json: $(RUNS)/rm0/final/manifest.json
	$(RLHF) rl policy.path=$(RUNS)/sft/final reward=rm reward.model.path=$(RUNS)/rm0/final output_dir=$(RUNS)/rl0 \
		$(DEV) $(RL_ARGS)

# each round's mined pairs listed MINED_COPIES times (a few hundred pairs beside the original thousands weigh little)
COPIES = $(foreach i,$(shell seq 1 $(MINED_COPIES)),$(1))

# one round: $(1) = this round, $(2) = the one before, $(3) = the pairs files of rounds 1..$(1)
define ROUND
$(RUNS)/gens$(1).jsonl: $(RUNS)/rl$(2)/final/manifest.json
	$(RLHF) generate model.path=$(RUNS)/rl$(2)/final samples_per_prompt=$(SAMPLES) seed=$(1) \
		output=$(RUNS)/gens$(1).jsonl $(DEV) $(GEN_ARGS)

$(RUNS)/pairs$(1).jsonl: $(RUNS)/gens$(1).jsonl $(RUNS)/rm$(2)/final/manifest.json
	$(RLHF) label input=$(RUNS)/gens$(1).jsonl judge=rule reward.functions=[$(RULE)] pairs=all mine=disagree \
		reward.model.path=$(RUNS)/rm$(2)/final output=$(RUNS)/pairs$(1).jsonl $(DEV)

$(RUNS)/rm$(1)/final/manifest.json: $(RUNS)/pairs$(1).jsonl $(ORIGINAL)
	$(RLHF) train-rm model.path=$(RUNS)/rm$(2)/final output_dir=$(RUNS)/rm$(1) \
		data.train=[$(subst $(space),$(comma),$(strip $(ORIGINAL) $(foreach f,$(3),$(call COPIES,$(f)))))] $(DEV) $(RM_ARGS)

$(RUNS)/rl$(1)/final/manifest.json: $(RUNS)/rm$(1)/final/manifest.json
	$(RLHF) rl policy.path=$(RUNS)/$(if $(filter previous,$(RL_FROM)),rl$(2)/final reference.path=$(RUNS)/sft,sft)/final reward=rm \
		reward.model.path=$(RUNS)/rm$(1)/final \
		output_dir=$(RUNS)/rl$(1) $(DEV) $(RL_ARGS)
endef

# the report (make -f scripts/loop.mk report): per round k, rl{k}'s samples on held-out prompts labeled by the rule
# (heldpairs{k}.jsonl), and the share of them rm{k} ranks the rule's way beside rl{k}'s held-out accuracy
define HELD
$(RUNS)/held$(1).jsonl: $(RUNS)/rl$(1)/final/manifest.json
	$(RLHF) generate model.path=$(RUNS)/rl$(1)/final samples_per_prompt=$(SAMPLES) seed=1000 \
		output=$(RUNS)/held$(1).jsonl $(DEV) $(HELD_ARGS)

$(RUNS)/heldpairs$(1).jsonl: $(RUNS)/held$(1).jsonl
	$(RLHF) label input=$(RUNS)/held$(1).jsonl judge=rule reward.functions=[$(RULE)] pairs=all \
		output=$(RUNS)/heldpairs$(1).jsonl
endef

$(foreach r,$(shell seq 0 $(ROUNDS)),$(eval $(call HELD,$(r))))

.PHONY: report
report: $(foreach r,$(shell seq 0 $(ROUNDS)),$(RUNS)/heldpairs$(r).jsonl)
	$(PYTHON) $(dir $(lastword $(MAKEFILE_LIST)))loop_report.py $(RUNS) $(ROUNDS)

$(foreach r,$(shell seq 1 $(ROUNDS)),$(eval $(call ROUND,$(r),$(shell expr $(r) - 1),\
	$(foreach k,$(shell seq 1 $(r)),$(RUNS)/pairs$(k).jsonl))))
