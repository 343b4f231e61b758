"""`rlhf dpo`: direct preference optimisation, a policy trained on preference pairs with no reward model.

    rlhf sft output_dir=runs/sft && rlhf dpo model.path=runs/sft/final output_dir=runs/dpo   # embedded, CPU
    rlhf dpo model.path=runs/sft/final data.train=pairs.jsonl data.eval=held_out.jsonl loss=ipo device=cuda
    torchrun --nproc-per-node 2 -m rlhf_cli dpo model.path=runs/sft/final             # DDP, same code path

Setup (config, devices, model, data, reference log-probs, optimizer, resume) -> loop -> save final/.
The data is train-rm's (prompt/chosen/rejected, or two conversations); each response is a completion of its prompt
ending at the stop token, tokenized as sft tokenizes a row. The reference is the starting checkpoint: every pair's
reference log-probs are computed once, before the first step, and kept in the run dir
(`reference_logprobs.safetensors`), so the reference model is never held beside the policy and a resumed run
reads them instead of recomputing (a reference-free loss, simpo, computes none). A micro-batch's pairs run in one
forward, each pair one block of a packed row whose prompt and the tokens both responses start with are computed
once (pair_logprobs, models/pairs.py); the loss is the registered one by name (algorithms/preference.py).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_cli import data
from rlhf_cli.algorithms import PREFERENCE_LOSSES, bind, chosen_nll, implicit_rewards
from rlhf_cli.engines.rollout import make_engine
from rlhf_cli.errors import DataError
from rlhf_cli.models import lora
from rlhf_cli.models import (check_generation_fits, check_models, dropout_off, load_causal_lm, load_trained_causal_lm,
                             model_and_tokenizer, position_limit, stop_token_ids)
from rlhf_cli.models.pairs import pair_sums
from rlhf_cli.training import checkpoint, distributed, loop, memory, optim
from rlhf_cli.training.evaluation import held_out_accuracy, stage_sampled_metrics
from rlhf_cli.training.precision import Precision
from rlhf_cli.training.tracking import Throughput, Tracker

REFERENCE_FILE = "reference_logprobs.safetensors"
# the per-pair statistics a step and an evaluation sum, in this order (pair_stats)
STATS = ("pref_loss", "pair_accuracy", "margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected")


@dataclass
class PairLogprobs:
    """Sequence log-probs of B pairs: each response's summed token log-probs and its token count, (B,) each."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def pair_logprobs(model, pairs: list[data.PairExample], pad_id: int, device) -> PairLogprobs:
    """One forward over the B pairs -> PairLogprobs (models/pairs.py: each pair one block of a packed row, its prompt
    and the tokens both responses start with computed once, under a tree-shaped attention mask; with a prompt of
    18 tokens and two 25-token answers that part at their 20th token, 48 tokens through the model where two whole
    rows are 86)."""
    chosen, rejected, tokens = pair_sums(model, [(p.chosen.prompt_ids, p.chosen.completion_ids,
                                                  p.rejected.completion_ids) for p in pairs], pad_id, device)
    tokens = tokens.to(chosen.dtype)
    return PairLogprobs(chosen, rejected, tokens[0], tokens[1])


@torch.no_grad()
def reference_logprobs(model, pairs: list[data.PairExample], pad_id: int, device, tokens: int, rt,
                       precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair's (chosen, rejected) log-probs under `model` as it is, (N,) float32 each on the CPU: each rank
    computes every world_size-th pair, in micro-batches of `tokens`, and the sums are all-reduced."""
    mine = list(range(rt.rank, len(pairs), rt.world_size))
    both = torch.zeros(2, len(pairs), dtype=torch.float64)
    groups = memory.same_count_everywhere(rt, model, memory.pair_groups([pairs[i].length for i in mine], tokens))
    for group, counts in groups:  # FSDP2: every rank runs as many forwards
        idx = [mine[g] for g in group]
        with precision.autocast():
            lp = pair_logprobs(model, [pairs[i] for i in idx], pad_id, device)
        if counts:
            both[:, idx] = torch.stack([lp.chosen, lp.rejected]).double().cpu()
    both = rt.all_reduce_sum(both.to(rt.device)).cpu()
    return both[0].float(), both[1].float()


def pairs_fingerprint(model_path: str, splits: dict[str, list[data.PairExample]]) -> str:
    """sha256 of the starting model's path and every pair's token ids: the reference file belongs to these."""
    h = hashlib.sha256(str(model_path).encode())
    for name, pairs in splits.items():
        h.update(name.encode())
        for p in pairs:
            for ids in (p.chosen.prompt_ids, p.chosen.completion_ids, p.rejected.completion_ids):
                h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes() + b"|")
    return h.hexdigest()


def pair_stats(losses: torch.Tensor, chosen_reward: torch.Tensor, rejected_reward: torch.Tensor,
               lp: PairLogprobs) -> torch.Tensor:
    """(len(STATS),) float64 sums over the B pairs: loss, ranked right (ties half), reward margin, rewards, and
    each response's mean per-token log-prob (falling on both sides is DPO's likelihood displacement)."""
    gap = (chosen_reward - rejected_reward).detach()
    per_pair = torch.stack([losses.detach(), (gap > 0).float() + 0.5 * (gap == 0).float(), gap,
                            chosen_reward.detach(), rejected_reward.detach(),
                            lp.chosen.detach() / lp.chosen_tokens.clamp(min=1),
                            lp.rejected.detach() / lp.rejected_tokens.clamp(min=1)])
    return per_pair.double().sum(-1).cpu()


class DPORecipe:
    """setup (data, model, reference log-probs, optimizer, resume) -> train (train_step, then the end-of-step tail)
    -> save final/.

    One step: a global batch of pairs; each micro-batch scores its chosen and rejected responses in one pass
    (pair_logprobs) and takes the configured loss against the kept reference log-probs."""

    def __init__(self, cfg, rt, run_dir, t_start: float):
        self.cfg, self.rt, self.run_dir, self.t_start = cfg, rt, run_dir, t_start

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, rt = self.cfg, self.rt
        check_models("dpo", cfg)  # a causal LM dir (from its config.json), before anything loads
        self.path, self.tokenizer = model_and_tokenizer(cfg.model, "model", self.run_dir.root, cfg.seed, rt)
        self.pad_id = self.tokenizer.pad_token_id
        check_generation_fits(self.path, {"eval.max_new_tokens": cfg.eval.max_new_tokens})  # before any weights
        self._setup_data()
        self.global_batch, self.total_steps = loop.batch_plan(cfg, rt, len(self.train_pairs))
        longest = max(p.length for p in self.train_pairs + self.eval_pairs)
        self.memory = memory.plan("micro_batch_tokens", cfg.micro_batch_tokens, rt.device, [(self.path, True)], [],
                                  longest, cfg.model.dtype, cfg.model.gradient_checkpointing, cfg.lora.r > 0,
                                  cfg.model.trust_remote_code, rows_together=2)  # before any weights load
        # forwards without gradients (reference, held-out pairs): at most a training batch's worth of tokens; the
        # plan's inference budget ran the reference 2.4x slower on CPU (227 against 543 pairs/s, tiny model)
        self.score_tokens = min(self.memory.infer_tokens, 2 * longest * cfg.batch_size)
        self._setup_model()
        self.optimizer, self.scheduler, self.guard = optim.build(self.model.parameters(), cfg.optim, self.total_steps)
        self.sampler = data.EpochSampler(len(self.train_pairs), cfg.seed, [p.length for p in self.train_pairs],
                                         self.global_batch)
        self.step = loop.resume(self.run_dir, rt, self.parts, self.optimizer, self.scheduler, self.precision,
                                sampler=self.sampler, guard=self.guard)
        self.reference, reference_said = self._reference()  # the starting weights' log-probs, kept in the run dir
        self._announce(reference_said)

    def _setup_data(self) -> None:
        cfg, tokenizer = self.cfg, self.tokenizer
        self.train_rows, eval_rows = data.stage_rows(cfg.data, "pairs", cfg.seed)
        stop_ids = stop_token_ids(tokenizer, self.path)  # each response ends at the stop token generation ends at
        limit = cfg.model.max_length
        self.train_pairs, self.train_dropped = data.tokenize_preference(tokenizer, self.train_rows, limit,
                                                                        "data.train", stop_ids)
        self.eval_pairs, self.eval_dropped = data.tokenize_preference(tokenizer, eval_rows, limit, "data.eval",
                                                                      stop_ids)
        for key, pairs, rows in (("data.train", self.train_pairs, self.train_rows), ("data.eval", self.eval_pairs,
                                                                                     eval_rows)):
            if not pairs:
                raise DataError(f"{key}: none of its {len(rows)} pairs fit in model.max_length={limit} tokens "
                                f"(prompt + longer response + stop token); raise model.max_length or give more data")
        # eval.rule's held-out prompts: each held-out pair's prompt once, with its row (the rule reads its columns)
        prompts = [data.split_pair_row(tokenizer, r, i, "data.eval")[0] for i, r in enumerate(eval_rows)]
        first = {p: i for i, p in reversed(list(enumerate(prompts)))}
        self.eval_rows = [eval_rows[i] for i in sorted(first.values())]
        self.eval_prompts = [prompts[i] for i in sorted(first.values())]

    def _setup_model(self) -> None:
        cfg, rt = self.cfg, self.rt
        self.precision = Precision(cfg.model.dtype, cfg.device.autocast, rt.device)
        # lora.r > 0: only adapters train; at step 0 they add nothing, so the reference is the base model
        model, self.adapters, self.parts = load_trained_causal_lm(self.path, cfg.model, cfg.lora, self.precision.weights,
                                                                  rt, self.run_dir.root)
        self.model = dropout_off(model)  # as TRL: dropout would make the policy's log-probs differ from the reference's
        self.ddp_model = distributed.wrap_model(model, rt, cfg.device.distributed)  # before the optimizer (FSDP2)
        self.engine = make_engine("auto", model, self.tokenizer, memory=self.memory)  # held-out generation
        self.max_sequence = min(cfg.model.max_length, position_limit(self.path) or cfg.model.max_length)
        self.loss_fn = bind(PREFERENCE_LOSSES.get(cfg.loss), {"beta": cfg.beta, "label_smoothing": cfg.label_smoothing,
                                                              "gamma": cfg.gamma}, 6, "loss")

    def _reference(self) -> tuple[dict[str, torch.Tensor], str]:
        """The reference log-probs of every train and held-out pair -> (tensors train_chosen, train_rejected,
        eval_chosen, eval_rejected; what was done, for the log). Read from the run dir when it holds the file for
        these pairs and model; else computed from the starting weights: the model as loaded on a fresh run, or the
        starting checkpoint loaded again when a resumed run lost the file (or its pairs changed)."""
        cfg, rt = self.cfg, self.rt
        if cfg.reference_free:
            return {}, f"no reference (loss={cfg.loss} is reference-free)"
        path = self.run_dir.root / REFERENCE_FILE
        splits = {"train": self.train_pairs, "eval": self.eval_pairs}
        fingerprint = pairs_fingerprint(self.path, splits)
        kept = checkpoint.read_tensors(path)
        if kept is not None and kept[1].get("fingerprint") == fingerprint:
            return kept[0], f"reference log-probs read from {path}"
        t0 = time.time()
        start = self.ddp_model
        if self.step:  # resumed without the file: the starting weights again, beside the policy for a moment
            start = dropout_off(load_causal_lm(self.path, "model.path", self.precision.weights, rt.device,
                                               cfg.model.trust_remote_code))
        tensors = {}
        for name, pairs in splits.items():
            tensors[f"{name}_chosen"], tensors[f"{name}_rejected"] = reference_logprobs(
                start, pairs, self.pad_id, rt.device, self.score_tokens, rt, self.precision)
        if rt.is_main:
            checkpoint.write_tensors(path, tensors, {"fingerprint": fingerprint, "model": str(self.path)})
        rt.barrier()
        return tensors, (f"reference log-probs of {sum(map(len, splits.values()))} pairs computed from {self.path} "
                         f"in {time.time() - t0:.0f} s and kept in {path}")

    def _announce(self, reference_said: str) -> None:
        cfg, rt, step = self.cfg, self.rt, self.step
        self.tracker = Tracker(self.run_dir.root, "dpo", self.total_steps, step, enabled=rt.is_main,
                               progress_keys=("loss", "pair_accuracy", "lr"))
        say = self.tracker.message
        say(f"dpo: {len(self.train_pairs)} train / {len(self.eval_pairs)} held-out pairs, loss={cfg.loss} "
            f"beta={cfg.beta:g}" + (f" sft_weight={cfg.sft_weight:g}" if cfg.sft_weight else "")
            + f", global batch {self.global_batch} = {cfg.batch_size} x {cfg.optim.grad_accum} accum x "
            f"{rt.world_size} ranks, {self.total_steps} steps, device {rt.device} ({self.precision.describe()}"
            + (f", {cfg.device.distributed}" if rt.distributed else "") + ")"
            + (f", resuming at step {step}" if step else ""))
        loop.announce_plan("dpo", say, self)
        say(f"dpo: {reference_said}")
        if any(d.startswith("beta=") for d in cfg.derived):
            say(f"dpo: beta={cfg.beta:g}: the default for loss={cfg.loss} (set beta to override)")
        loop.say_dropped_pairs("dpo", say, cfg.model.max_length, [("training", self.train_dropped, self.train_pairs),
                                                                  ("held-out", self.eval_dropped, self.eval_pairs)])

    # ---------------------------------------------------------------- train
    def train(self) -> dict:
        before = loop.evaluate_before(self)
        self.throughput = Throughput()
        return self.save(loop.train_steps(self), before)

    def pair_terms(self, lp: PairLogprobs, idx: list[int], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of each pair (B,) and its stats (pair_stats), against the kept reference log-probs of pairs
        `idx` of `split`."""
        device = lp.chosen.device
        ref_c, ref_r = ((None, None) if self.cfg.reference_free else
                        (self.reference[f"{split}_chosen"][idx].to(device), self.reference[f"{split}_rejected"][idx].to(device)))
        losses = self.loss_fn(lp.chosen, lp.rejected, ref_c, ref_r, lp.chosen_tokens, lp.rejected_tokens)
        rewards = implicit_rewards(lp.chosen, lp.rejected, ref_c, ref_r, lp.chosen_tokens, lp.rejected_tokens,
                                   beta=self.cfg.beta, reference_free=self.cfg.reference_free)
        return losses, pair_stats(losses, *rewards, lp)

    def train_step(self) -> dict:
        """One optimizer step over a global batch of pairs (this rank's micro-batches, accumulated) -> its metrics."""
        cfg, rt, global_batch, pairs = self.cfg, self.rt, self.global_batch, self.train_pairs
        indices = self.sampler.take(global_batch)  # every rank draws the same global batch ...
        chunks = [indices[i:i + cfg.batch_size] for i in range(0, global_batch, cfg.batch_size)]
        mine = [i for chunk in chunks[rt.rank::rt.world_size] for i in chunk]  # ... and takes its own pairs
        chosen_tokens = sum(len(pairs[i].chosen.completion_ids) for i in indices)  # the SFT term's normaliser
        sums = torch.zeros(len(STATS) + 1, dtype=torch.float64)  # + the SFT term
        groups = memory.same_count_everywhere(rt, self.ddp_model,
                                              memory.pair_groups([pairs[i].length for i in mine], self.memory.tokens))
        for micro, (group, counts) in enumerate(groups):
            idx = [mine[g] for g in group]
            with distributed.no_sync(self.ddp_model, micro == len(groups) - 1), self.precision.autocast():
                lp = pair_logprobs(self.ddp_model, [pairs[i] for i in idx], self.pad_id, rt.device)
                losses, stats = self.pair_terms(lp, idx, "train")
                # this micro-batch's share of the batch's per-token NLL of the chosen responses (RPO)
                sft = chosen_nll(lp.chosen, chosen_tokens)
                loss = losses.sum() / global_batch + cfg.sft_weight * sft
                # FSDP2's matching forward weighs 0; DDP / FSDP average over ranks, so scale back up
                self.precision.backward(loss * (rt.world_size if counts else 0.0))
            if counts:
                sums += torch.cat([stats, torch.tensor([float(sft.detach())], dtype=torch.float64)])
        values = (rt.all_reduce_sum(sums.to(rt.device)).cpu() / global_batch).tolist()
        metrics = dict(zip(STATS, values))
        metrics["sft_loss"] = values[-1] * global_batch  # summed over micro-batches and ranks, not averaged
        metrics["loss"] = metrics["pref_loss"] + cfg.sft_weight * metrics["sft_loss"]
        grad_norm, applied = self.guard.step(self.model.parameters(), self.optimizer, metrics["loss"],
                                             scaler=self.precision.scaler, at_step=self.step + 1)
        self.scheduler.step()
        self.step += 1
        logged = self.step % cfg.log_every == 0 or self.step == self.total_steps
        return metrics | {"lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "applied": int(applied),
                          "epoch": self.sampler.epoch,
                          "pairs_per_s": self.throughput.rate(global_batch * cfg.log_every) if logged else None}

    @torch.no_grad()
    def pair_metrics(self) -> dict:
        """Held-out pairs: the loss, the share ranked right by the implicit rewards, the reward margin and rewards,
        the mean per-token log-probs (rank 0, the gathered model)."""
        self.model.eval()
        sums = torch.zeros(len(STATS), dtype=torch.float64)
        for group in memory.pair_groups([p.length for p in self.eval_pairs], self.score_tokens):
            with self.precision.autocast():
                lp = pair_logprobs(self.model, [self.eval_pairs[i] for i in group], self.pad_id, self.rt.device)
                sums += self.pair_terms(lp, group, "eval")[1]
        dropout_off(self.model)
        values = dict(zip(STATS, (sums / len(self.eval_pairs)).tolist()))
        return {"eval_loss": values.pop("pref_loss")} | {f"eval_{k}": v for k, v in values.items()}

    def evaluate(self) -> loop.Evaluation:
        """Held-out pair metrics, and eval.rule's greedy accuracy (with eval.samples=K, pass@k) on the held-out
        pairs' prompts."""
        with distributed.gathered(self.model):  # FSDP2: every rank gathers the weights, rank 0 evaluates
            if not self.rt.is_main:
                return loop.Evaluation({})
            cfg, rt = self.cfg, self.rt
            metrics = self.pair_metrics()
            accuracy, samples, mean_len, _ = held_out_accuracy(self.engine, self.tokenizer, self.eval_rows,
                                                               self.eval_prompts, cfg.eval, rt.device, self.max_sequence)
            metrics["eval_response_chars"] = mean_len
            if accuracy is not None:
                metrics["eval_accuracy"] = accuracy
            metrics |= stage_sampled_metrics(self.engine, self.tokenizer, self.eval_rows, self.eval_prompts, cfg.eval,
                                             rt.device, cfg.seed, self.max_sequence)
            dropout_off(self.model)
            return loop.Evaluation(metrics, samples)

    def save_checkpoint(self) -> None:
        loop.save_checkpoint(self)

    # ---------------------------------------------------------------- save
    def save(self, last: loop.Evaluation, before: loop.Evaluation) -> dict:
        cfg, rt, run_dir = self.cfg, self.rt, self.run_dir
        manifest = loop.final_manifest(self, "dpo", last, before) | lora.manifest_entry(self.adapters) | {
            "preference": {"loss": cfg.loss, "beta": cfg.beta, "sft_weight": cfg.sft_weight,
                           "reference": "none" if cfg.reference_free else str(self.path)},
            "pairs": {"train": len(self.train_pairs), "eval": len(self.eval_pairs),
                      "dropped_train": self.train_dropped, "dropped_eval": self.eval_dropped}}
        checkpoint.save_final(run_dir, rt, self.model, self.tokenizer, manifest,  # collective; rank 0 writes
                              hf_model=self.adapters.final_model() if self.adapters else None)
        results = last.metrics
        table = loop.before_after(results, before.metrics, {"eval_pair_accuracy": "pairs ranked right",
                                                            "eval_margin": "reward margin",
                                                            "eval_accuracy": "accuracy (eval.rule)"})
        loop.report("dpo", rt, self.tracker, run_dir, table, self.step, self.t_start, "held-out samples (greedy)",
                    last.samples)
        return results


def run(cfg, output_dir: Path) -> dict:
    return loop.run_stage("dpo", cfg, output_dir, DPORecipe)
