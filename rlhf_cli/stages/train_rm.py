"""`rlhf train-rm`: a scalar reward model from preference pairs (pairwise Bradley-Terry loss).

    rlhf sft output_dir=runs/sft && rlhf train-rm model.path=runs/sft/final output_dir=runs/rm   # embedded, CPU
    rlhf train-rm model.path=runs/sft/final data.train=pairs.jsonl data.eval=held_out.jsonl device=cuda
    torchrun --nproc-per-node 2 -m rlhf_cli train-rm model.path=runs/sft/final           # DDP, same code path

Setup (config, devices, model, data, optimizer, resume) -> loop -> save final/.
Any causal LM (or sequence classifier) becomes backbone + a fresh one-output
head. A pair's sides are scored as the text `prompt + response`, tokenized
whole with the saved tokenizer and nothing appended, and the score is read at
the last token: what any client does (`tokenizer(prompt + response)` into
`AutoModelForSequenceClassification.from_pretrained(final/)`, TRL's reward
functions, a serving stack), so every client gets the stage's score.
Chosen and rejected sequences go through ONE forward pass per micro-batch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_cli import data
from rlhf_cli.algorithms.reward import pairwise_loss
from rlhf_cli.errors import DataError
from rlhf_cli.models import lora
from rlhf_cli.models import check_models, load_scalar_head_model, model_and_tokenizer
from rlhf_cli.models.scoring import Pair, last_token_scores, pad_right, tokenize_pairs
from rlhf_cli.training import checkpoint, distributed, loop, memory, optim
from rlhf_cli.training.precision import Precision
from rlhf_cli.training.tracking import Throughput, Tracker


def pair_batch(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one right-padded batch: input_ids, attention_mask (2B, L); margin (B,)."""
    sequences = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    ids, mask = pad_right(sequences, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "margin": torch.tensor([p.margin for p in pairs])}


class Scorer(torch.nn.Module):
    """last_token_scores as a module, so a DDP wrapper's forward (and gradient sync) runs it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return last_token_scores(self.model, input_ids, attention_mask)  # (2B,)


def pair_scores(scorer, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the 2B sequences -> (chosen scores (B,), rejected scores (B,))."""
    scores = scorer(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    return scores.chunk(2)


@torch.no_grad()
def evaluate_pairs(scorer, pairs: list[Pair], tokens: int, pad_id: int, device) -> dict:
    """Held-out pairwise accuracy (ties count half), mean margin r_c - r_r, BT loss, score mean/std."""
    scorer.eval()
    chosen, rejected, margins = [], [], []
    for group in memory.pair_groups([p.length for p in pairs], tokens):
        batch = pair_batch([pairs[i] for i in group], pad_id)
        c, r = pair_scores(scorer, batch, device)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
        margins.append(batch["margin"])
    scorer.train()
    chosen, rejected, margins = torch.cat(chosen), torch.cat(rejected), torch.cat(margins)
    loss, _ = pairwise_loss(chosen, rejected, margins)
    gap = chosen - rejected
    scores = torch.cat([chosen, rejected])
    return {"eval_accuracy": float((gap > 0).float().mean() + 0.5 * (gap == 0).float().mean()),
            "eval_margin": float(gap.mean()), "eval_loss": float(loss),
            "eval_score_mean": float(scores.mean()), "eval_score_std": float(scores.std())}


@torch.no_grad()
def _samples(scorer, tokenizer, pairs: list[Pair], cfg, device) -> list[tuple[str, str, str]]:
    shown = pairs[: cfg.eval.show_samples]
    if not shown:
        return []
    chosen, rejected = pair_scores(scorer.eval(), pair_batch(shown, tokenizer.pad_token_id), device)
    text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return [(p.prompt, f"{text(p.chosen_ids)[len(p.prompt):]}  ({float(c):+.2f})\n"
                       f"{text(p.rejected_ids)[len(p.prompt):]}  ({float(r):+.2f})",
             "right" if c > r else "wrong") for p, c, r in zip(shown, chosen, rejected)]


class RewardModelRecipe:
    """setup (data, model, optimizer, resume) -> train (train_step, then the end-of-step tail) -> save final/.

    One step: a global batch of preference pairs; each micro-batch scores its chosen and rejected
    sequences in one forward (pair_batch) and takes the pairwise loss (algorithms/reward.py)."""

    def __init__(self, cfg, rt, run_dir, t_start: float):
        self.cfg, self.rt, self.run_dir, self.t_start = cfg, rt, run_dir, t_start

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, rt = self.cfg, self.rt
        check_models("train-rm", cfg)  # a model dir (not a run dir), before anything loads
        self.path, self.tokenizer = model_and_tokenizer(cfg.model, "model", self.run_dir.root, cfg.seed, rt)
        self.pad_id = self.tokenizer.pad_token_id
        self._setup_data()
        self.global_batch, self.total_steps = loop.batch_plan(cfg, rt, len(self.train_pairs))
        longest = max(p.length for p in self.train_pairs + self.eval_pairs)
        self.memory = memory.plan("micro_batch_tokens", cfg.micro_batch_tokens, rt.device, [(self.path, False)], [],
                                  longest, cfg.model.dtype, cfg.model.gradient_checkpointing, cfg.lora.r > 0,
                                  cfg.model.trust_remote_code,
                                  rows_together=2)  # a pair's two rows in one forward; before any weights load
        self._setup_model()
        self.optimizer, self.scheduler, self.guard = optim.build(self.model.parameters(), cfg.optim, self.total_steps)
        self.sampler = data.EpochSampler(len(self.train_pairs), cfg.seed, [p.length for p in self.train_pairs],
                                         self.global_batch)
        self.step = loop.resume(self.run_dir, rt, self.parts, self.optimizer, self.scheduler, self.precision,
                                sampler=self.sampler, guard=self.guard)
        self._announce()

    def _setup_data(self) -> None:
        cfg, tokenizer, max_length = self.cfg, self.tokenizer, self.cfg.model.max_length
        self.train_rows, eval_rows = data.stage_rows(cfg.data, "pairs", cfg.seed)
        self.train_pairs, self.train_dropped = tokenize_pairs(tokenizer, self.train_rows, max_length, "data.train",
                                                              cfg.margin_from_data)
        self.eval_pairs, self.eval_dropped = tokenize_pairs(tokenizer, eval_rows, max_length, "data.eval",
                                                            cfg.margin_from_data)
        for key, pairs, rows in (("data.train", self.train_pairs, self.train_rows), ("data.eval", self.eval_pairs, eval_rows)):
            if not pairs:
                raise DataError(f"{key}: none of its {len(rows)} pairs fit in model.max_length={max_length} tokens "
                                f"(prompt + longer response + EOS); raise model.max_length or give more data")

    def _setup_model(self) -> None:
        cfg, rt = self.cfg, self.rt
        self.precision = Precision(cfg.model.dtype, cfg.device.autocast, rt.device)
        model = load_scalar_head_model(self.path, "model.path", self.precision.weights, rt.device,
                                       cfg.model.trust_remote_code, pad_id=self.pad_id)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        # lora.r > 0: adapters + score head train
        self.adapters = lora.attach(model, cfg.lora, "SEQ_CLS", self.path, self.run_dir.root, rt)
        model.train()
        self.model, self.scorer = model, Scorer(model)
        # before the optimizer: FSDP2 shards in place, with the Scorer as its root (its forward gathers the head)
        self.ddp_scorer = distributed.wrap_model(self.scorer, rt, cfg.device.distributed)
        self.parts = {"model": (self.scorer, "model.")}  # checkpoint tensors: the HF model's own keys
        if self.adapters:
            self.parts = {"model": (self.adapters.state, "")}  # LoRA: the adapters and the score head only

    def _announce(self) -> None:
        cfg, rt, step = self.cfg, self.rt, self.step
        self.tracker = Tracker(self.run_dir.root, "train-rm", self.total_steps, step, enabled=rt.is_main,
                               progress_keys=("loss", "accuracy", "lr"))
        tracker_message = self.tracker.message
        tracker_message(f"train-rm: {len(self.train_pairs)} train / {len(self.eval_pairs)} held-out pairs, global batch "
                        f"{self.global_batch} = {cfg.batch_size} x {cfg.optim.grad_accum} accum x {rt.world_size} "
                        f"ranks, {self.total_steps} steps, device {rt.device} ({self.precision.describe()}"
                        + (f", {cfg.device.distributed}" if rt.distributed else "") + ")"
                        + (f", resuming at step {step}" if step else ""))
        loop.announce_plan("train-rm", tracker_message, self)
        loop.say_dropped_pairs("train-rm", tracker_message, cfg.model.max_length,
                               [("training", self.train_dropped, self.train_pairs),
                                ("held-out", self.eval_dropped, self.eval_pairs)])

    # ---------------------------------------------------------------- train
    def train(self) -> dict:
        before = loop.evaluate_before(self)
        self.throughput = Throughput()
        return self.save(loop.train_steps(self), before)

    def train_step(self) -> dict:
        """One optimizer step over a global batch of pairs (this rank's micro-batches, accumulated) -> its metrics."""
        cfg, rt, global_batch = self.cfg, self.rt, self.global_batch
        indices = self.sampler.take(global_batch)  # every rank draws the same global batch ...
        chunks = [indices[i:i + cfg.batch_size] for i in range(0, global_batch, cfg.batch_size)]
        mine = [self.train_pairs[i] for chunk in chunks[rt.rank::rt.world_size] for i in chunk]  # ... its own pairs
        sums = torch.zeros(4, dtype=torch.float64)  # pair-weighted loss, bt_loss, accuracy, margin
        groups = memory.same_count_everywhere(rt, self.ddp_scorer, memory.pair_groups([p.length for p in mine], self.memory.tokens))
        for micro, (group, counts) in enumerate(groups):
            batch = pair_batch([mine[i] for i in group], self.pad_id)
            sync = micro == len(groups) - 1
            weight = len(group) if counts else 0  # FSDP2: a forward to match another rank's, weighted 0
            with distributed.no_sync(self.ddp_scorer, sync), self.precision.autocast():
                chosen, rejected = pair_scores(self.ddp_scorer, batch, rt.device)  # (B,), (B,)
                loss, stats = pairwise_loss(chosen, rejected, batch["margin"], cfg.center_coef)
                # weight each micro-batch by its share of the global batch; DDP / FSDP average over ranks, so scale back up
                self.precision.backward(loss * weight * rt.world_size / global_batch)
            sums += weight * torch.tensor([float(loss.detach()), float(stats["bt_loss"]),
                                               float(stats["accuracy"]), float(stats["margin"])], dtype=torch.float64)
        loss_value, bt_value, accuracy, margin = (rt.all_reduce_sum(sums.to(rt.device)).cpu() / global_batch).tolist()
        grad_norm, applied = self.guard.step(self.scorer.parameters(), self.optimizer, loss_value,
                                             scaler=self.precision.scaler, at_step=self.step + 1)
        self.scheduler.step()
        self.step += 1
        logged = self.step % cfg.log_every == 0 or self.step == self.total_steps
        return {"loss": loss_value, "bt_loss": bt_value, "accuracy": accuracy, "margin": margin,
                "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "applied": int(applied),
                "epoch": self.sampler.epoch,
                "pairs_per_s": self.throughput.rate(global_batch * cfg.log_every) if logged else None}

    def evaluate(self) -> loop.Evaluation:
        """Held-out pairwise accuracy, margin and score statistics (the samples are drawn at the end, by save)."""
        with distributed.gathered(self.scorer):  # FSDP2: every rank gathers the weights, rank 0 evaluates
            if not self.rt.is_main:
                return loop.Evaluation({})
            return loop.Evaluation(evaluate_pairs(self.scorer, self.eval_pairs, self.memory.infer_tokens,
                                                  self.pad_id, self.rt.device))

    def save_checkpoint(self) -> None:
        loop.save_checkpoint(self)

    # ---------------------------------------------------------------- save
    def save(self, last: loop.Evaluation, before: loop.Evaluation) -> dict:
        cfg, rt, run_dir = self.cfg, self.rt, self.run_dir
        results = last.metrics
        manifest = {} if not rt.is_main else loop.final_manifest(self, "train-rm", last, before) | {
            # RL standardises rewards with these (held-out chosen + rejected scores)
            "score_mean": results["eval_score_mean"], "score_std": results["eval_score_std"],
            "eval_accuracy": results["eval_accuracy"],
            "scoring": "tokenizer(prompt + response), nothing appended; score read at the last token "
                       "(rlhf_cli.models.scoring.score_texts, plain AutoModelForSequenceClassification)",
            "pairs": {"train": len(self.train_pairs), "eval": len(self.eval_pairs),
                      "dropped_train": self.train_dropped, "dropped_eval": self.eval_dropped}}
        before = before.metrics
        checkpoint.save_final(run_dir, rt, self.scorer, self.tokenizer, {**manifest, **lora.manifest_entry(self.adapters)},
                              prefix="model.", hf_model=self.adapters.final_model() if self.adapters else self.model)
        with distributed.gathered(self.scorer):
            shown = _samples(self.scorer, self.tokenizer, self.eval_pairs, cfg, rt.device) if rt.is_main else []
        table = {} if not rt.is_main else {
            "held-out pairwise accuracy before": before.get("eval_accuracy", "(resumed)"),
            "held-out pairwise accuracy after": results["eval_accuracy"],
            "held-out mean margin r_c - r_r": results["eval_margin"],
            "held-out score mean / std": f"{results['eval_score_mean']:.3g} / {results['eval_score_std']:.3g}"}
        loop.report("train-rm", rt, self.tracker, run_dir, table, self.step, self.t_start,
                    "held-out pairs (score of chosen / rejected)", shown)
        return dict(results)


def run(cfg, output_dir: Path) -> dict:
    return loop.run_stage("train-rm", cfg, output_dir, RewardModelRecipe)
