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

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_cli import checkpoint, data, lora, runtime, signals, training
from rlhf_cli.algorithms.reward import pairwise_loss
from rlhf_cli.checkpoint import RunDir
from rlhf_cli.errors import DataError
from rlhf_cli.modeling import last_token_scores, load_scalar_head_model, load_tokenizer, pad_right, scoring_ids
from rlhf_cli.tracking import Tracker


@dataclass
class Pair:
    """One tokenized preference pair: each side is `prompt + response` tokenized whole (scoring_ids)."""
    prompt: str
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0

    @property
    def length(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))


def tokenize_pairs(tokenizer, rows: list[dict], max_length: int, key: str, use_margin: bool) -> tuple[list[Pair], int]:
    """-> (pairs, number dropped). A pair longer than max_length is dropped, not cut:
    cutting would remove the last token the score is read at, or the very tokens that differ."""
    pairs, dropped = [], 0
    for i, row in enumerate(rows):
        prompt, chosen, rejected = data.split_pair_row(tokenizer, row, i, key)
        margin = row.get("margin") if use_margin else None
        try:
            margin = 0.0 if margin is None else float(margin)
        except (TypeError, ValueError):
            raise DataError(f"{key}: row {i} has margin {margin!r}, not a number; fix it or set margin_from_data=false") from None
        if not math.isfinite(margin):
            raise DataError(f"{key}: row {i} has a non-finite margin ({margin}); fix it or set margin_from_data=false")
        pair = Pair(prompt, scoring_ids(tokenizer, prompt, chosen), scoring_ids(tokenizer, prompt, rejected), margin)
        if pair.length > max_length:
            dropped += 1
            continue
        pairs.append(pair)
    return pairs, dropped


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
def evaluate_pairs(scorer, pairs: list[Pair], batch_size: int, pad_id: int, device) -> dict:
    """Held-out pairwise accuracy (ties count half), mean margin r_c - r_r, BT loss, score mean/std."""
    scorer.eval()
    chosen, rejected, margins = [], [], []
    for i in range(0, len(pairs), batch_size):
        batch = pair_batch(pairs[i:i + batch_size], pad_id)
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


def run(cfg, output_dir: Path) -> dict:
    # ---------------------------------------------------------------- setup
    t_start = time.time()
    training.check_trainable_dtype(cfg.model, "model", cfg.device.type)
    rt = runtime.setup(cfg.device, cfg.seed)
    run_dir = RunDir(output_dir, dataclasses.asdict(cfg), "train-rm", rt.is_main)
    try:
        return _train(cfg, rt, run_dir, t_start)
    finally:
        run_dir.release()
        runtime.teardown()


def _train(cfg, rt, run_dir: RunDir, t_start: float) -> dict:
    path = training.model_path(cfg.model, run_dir.root, cfg.seed, rt)
    tokenizer = load_tokenizer(path, "model.path", cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    train_rows, eval_rows = data.stage_rows(cfg.data, "pairs", cfg.seed)
    max_length = cfg.model.max_length
    train_pairs, train_dropped = tokenize_pairs(tokenizer, train_rows, max_length, "data.train", cfg.margin_from_data)
    eval_pairs, eval_dropped = tokenize_pairs(tokenizer, eval_rows, max_length, "data.eval", cfg.margin_from_data)
    for key, pairs, rows in (("data.train", train_pairs, train_rows), ("data.eval", eval_pairs, eval_rows)):
        if not pairs:
            raise DataError(f"{key}: none of its {len(rows)} pairs fit in model.max_length={max_length} tokens "
                            f"(prompt + longer response + EOS); raise model.max_length or give more data")

    precision = training.Precision(cfg.model.dtype, cfg.device.autocast, rt.device)
    model = load_scalar_head_model(path, "model.path", precision.weights, rt.device, cfg.model.trust_remote_code)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    adapters = lora.attach(model, cfg.lora, "SEQ_CLS", path, run_dir.root, rt)  # lora.r > 0: adapters + score head train
    model.train()
    scorer = Scorer(model)
    # before the optimizer: FSDP2 shards in place, with the Scorer as its root (its forward gathers the head)
    ddp_scorer = training.wrap_model(scorer, rt, cfg.device.distributed)
    parts = {"model": (scorer, "model.")}  # checkpoint tensors: the HF model's own keys
    if adapters:
        parts = {"model": (adapters.state, "")}  # LoRA: the adapters and the score head only

    global_batch = cfg.batch_size * cfg.optim.grad_accum * rt.world_size
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_pairs) / global_batch))
    optimizer = training.build_optimizer(model.parameters(), cfg.optim)
    scheduler = training.build_scheduler(optimizer, cfg.optim, total_steps)
    sampler = data.EpochSampler(len(train_pairs), cfg.seed, [p.length for p in train_pairs], global_batch)
    guard = training.StepGuard(cfg.optim.max_grad_norm, cfg.optim.max_bad_steps)

    step = 0
    ckpt = run_dir.latest(warn=print if rt.is_main else None)
    if ckpt is not None:
        state = training.load_checkpoint(ckpt, rt, parts, optimizer, scheduler, precision)
        step = int(state["step"])
        sampler.load_state_dict(state["sampler"])

    tracker = Tracker(run_dir.root, "train-rm", total_steps, step, enabled=rt.is_main,
                      progress_keys=("loss", "accuracy", "lr"))
    tracker.message(f"train-rm: {len(train_pairs)} train / {len(eval_pairs)} held-out pairs, global batch {global_batch} "
                    f"= {cfg.batch_size} x {cfg.optim.grad_accum} accum x {rt.world_size} ranks, {total_steps} steps, "
                    f"device {rt.device} ({precision.describe()}"
                    + (f", {cfg.device.distributed}" if rt.distributed else "") + ")"
                    + (f", resuming at step {step}" if step else ""))
    if adapters:
        tracker.message(f"train-rm: {adapters.describe()}")
    for key, dropped, kept in (("training", train_dropped, train_pairs), ("held-out", eval_dropped, eval_pairs)):
        if dropped:
            tracker.message(f"train-rm: dropped {dropped} of {dropped + len(kept)} {key} pairs longer than "
                            f"model.max_length={max_length} tokens (raise model.max_length to keep them)")

    def evaluate() -> dict:
        with training.gathered(scorer):  # FSDP2: every rank gathers the weights, rank 0 evaluates
            return evaluate_pairs(scorer, eval_pairs, cfg.eval.batch_size, pad_id, rt.device) if rt.is_main else {}

    before = evaluate() if step == 0 else {}
    if before:
        tracker.log(0, before, kind="eval")

    # ---------------------------------------------------------------- loop
    throughput = training.Throughput()
    last_eval = None  # {} on ranks other than 0
    while step < total_steps:
        indices = sampler.take(global_batch)  # every rank draws the same global batch ...
        chunks = [indices[i:i + cfg.batch_size] for i in range(0, global_batch, cfg.batch_size)]
        mine = chunks[rt.rank::rt.world_size]  # ... and takes its own micro-batches
        sums = torch.zeros(4, dtype=torch.float64)  # pair-weighted loss, bt_loss, accuracy, margin
        for micro, chunk in enumerate(mine):
            batch = pair_batch([train_pairs[i] for i in chunk], pad_id)
            sync = micro == len(mine) - 1
            with training.no_sync(ddp_scorer, sync), precision.autocast():
                chosen, rejected = pair_scores(ddp_scorer, batch, rt.device)  # (B,), (B,)
                loss, stats = pairwise_loss(chosen, rejected, batch["margin"], cfg.center_coef)
                # weight each micro-batch by its share of the global batch; DDP / FSDP average over ranks, so scale back up
                precision.backward(loss * len(chunk) * rt.world_size / global_batch)
            sums += len(chunk) * torch.tensor([float(loss.detach()), float(stats["bt_loss"]),
                                               float(stats["accuracy"]), float(stats["margin"])], dtype=torch.float64)
        loss_value, bt_value, accuracy, margin = (rt.all_reduce_sum(sums.to(rt.device)).cpu() / global_batch).tolist()
        grad_norm, applied = guard.step(scorer.parameters(), optimizer, loss_value, scaler=precision.scaler)
        scheduler.step()
        step += 1

        if step % cfg.log_every == 0 or step == total_steps:
            tracker.log(step, {"loss": loss_value, "bt_loss": bt_value, "accuracy": accuracy, "margin": margin,
                               "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "applied": int(applied),
                               "epoch": sampler.epoch, "pairs_per_s": throughput.rate(global_batch * cfg.log_every)})
        else:
            tracker.advance(step)
        if step % cfg.eval.every == 0 or step == total_steps:
            last_eval = evaluate()
            tracker.log(step, last_eval, kind="eval")
        stop = signals.stop_requested(rt)  # SIGTERM / SIGINT: checkpoint this step, then exit 143 / 130
        if step % cfg.checkpoint.every == 0 or step == total_steps or stop:  # collective; rank 0 writes
            training.save_checkpoint(run_dir, rt, step, parts, optimizer, scheduler, cfg.checkpoint.keep_last,
                                     precision, sampler=sampler.state_dict())
        rt.barrier()
        if stop and step < total_steps:
            raise signals.stopped(stop, step, total_steps, run_dir)

    # ---------------------------------------------------------------- save
    if last_eval is None:
        last_eval = evaluate()
    results = dict(last_eval)
    parent = checkpoint.read_manifest(cfg.model.path)
    manifest = {} if not rt.is_main else {
            "stage": "train-rm", "run_dir": str(run_dir.root.resolve()), "parent_model": cfg.model.path or "embedded tiny model",
            "parent_run": parent.get("run_dir"), "config": dataclasses.asdict(cfg),
            "data_fingerprint": checkpoint.fingerprint(train_rows), "steps": step, "metrics": results,
            "metrics_before": before,
            # RL standardises rewards with these (held-out chosen + rejected scores)
            "score_mean": results["eval_score_mean"], "score_std": results["eval_score_std"],
            "eval_accuracy": results["eval_accuracy"],
            "scoring": "tokenizer(prompt + response), nothing appended; score read at the last token "
                       "(rlhf_cli.modeling.score_texts, plain AutoModelForSequenceClassification)",
            "pairs": {"train": len(train_pairs), "eval": len(eval_pairs),
                      "dropped_train": train_dropped, "dropped_eval": eval_dropped}, "world_size": rt.world_size}
    training.save_final(run_dir, rt, scorer, tokenizer, {**manifest, **lora.manifest_entry(adapters)}, prefix="model.",
                        hf_model=adapters.final_model() if adapters else model)  # collective
    with training.gathered(scorer):
        shown = _samples(scorer, tokenizer, eval_pairs, cfg, rt.device) if rt.is_main else []
    if rt.is_main:
        table = {"held-out pairwise accuracy before": before.get("eval_accuracy", "(resumed)"),
                 "held-out pairwise accuracy after": results["eval_accuracy"],
                 "held-out mean margin r_c - r_r": results["eval_margin"],
                 "held-out score mean / std": f"{results['eval_score_mean']:.3g} / {results['eval_score_std']:.3g}",
                 "steps": step, "wall time (s)": round(time.time() - t_start, 1), "final model": str(run_dir.final)}
        tracker.samples("held-out pairs (score of chosen / rejected)", shown)
        tracker.table("train-rm results", table)
    tracker.close()
    return results
