"""`rlhf sft`: supervised fine-tuning, next-token loss on completion tokens only.

    rlhf sft                                             # embedded tiny model + task, CPU, ~1 min
    rlhf sft model.path=runs/base data.train=train.jsonl data.eval=eval.jsonl device=cuda
    torchrun --nproc-per-node 2 -m rlhf_cli sft          # DDP, same code path

Setup (config, devices, model, data, optimizer, resume) -> loop -> save final/.
Sequences are packed into rows of model.max_length tokens with a
block-diagonal causal mask (no attention across examples, no padding waste).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf_cli import checkpoint, data, lora, runtime, signals, training
from rlhf_cli.checkpoint import RunDir
from rlhf_cli.errors import DataError
from rlhf_cli.modeling import load_causal_lm, load_tokenizer
from rlhf_cli.tracking import Tracker


def token_loss_sum(model, batch: dict, device) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over completion tokens (labels != -100) and their count."""
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits[:, :-1].float()  # (R, L-1, V)
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def make_batch(examples, cfg, pad_id):
    if cfg.packing:
        return data.packed_batch(examples, cfg.model.max_length, pad_id)
    return data.padded_batch(examples, pad_id)


@torch.no_grad()
def eval_loss(model, examples, cfg, pad_id, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), cfg.batch_size):
        loss, n = token_loss_sum(model, make_batch(examples[i:i + cfg.batch_size], cfg, pad_id), device)
        total, count = total + float(loss), count + n
    model.train()
    return total / max(1, count)


def run(cfg, output_dir: Path) -> dict:
    # ---------------------------------------------------------------- setup
    t_start = time.time()
    training.check_trainable_dtype(cfg.model, "model", cfg.device.type)
    rt = runtime.setup(cfg.device, cfg.seed)
    run_dir = RunDir(output_dir, dataclasses.asdict(cfg), "sft", rt.is_main)
    try:
        return _train(cfg, rt, run_dir, t_start)
    finally:
        run_dir.release()
        runtime.teardown()


def _train(cfg, rt, run_dir: RunDir, t_start: float) -> dict:
    path = training.model_path(cfg.model, run_dir.root, cfg.seed, rt)
    tokenizer = load_tokenizer(path, "model.path", cfg.model.trust_remote_code)
    train_rows, eval_rows = data.stage_rows(cfg.data, "sft", cfg.seed)
    train_examples, truncated = data.tokenize_sft(tokenizer, train_rows, cfg.model.max_length, "data.train")
    eval_examples, _ = data.tokenize_sft(tokenizer, eval_rows, cfg.model.max_length, "data.eval")
    if not train_examples:
        raise DataError("data.train has no usable rows")
    eval_prompts = [data.split_sft_row(tokenizer, r, i, "data.eval")[0] for i, r in enumerate(eval_rows)]

    precision = training.Precision(cfg.model.dtype, cfg.device.autocast, rt.device)
    model = load_causal_lm(path, "model.path", precision.weights, rt.device, cfg.model.trust_remote_code)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    adapters = lora.attach(model, cfg.lora, "CAUSAL_LM", path, run_dir.root, rt)  # lora.r > 0: only adapters train
    parts = {"model": (adapters.state if adapters else model, "")}  # LoRA: checkpoints hold the adapter tensors only
    model.train()
    ddp_model = training.wrap_model(model, rt, cfg.device.distributed)  # before the optimizer: FSDP2 shards in place

    global_batch = cfg.batch_size * cfg.optim.grad_accum * rt.world_size
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_examples) / global_batch))
    optimizer = training.build_optimizer(model.parameters(), cfg.optim)
    scheduler = training.build_scheduler(optimizer, cfg.optim, total_steps)
    lengths = None if cfg.packing else [ex.length for ex in train_examples]  # bucket when padding
    sampler = data.EpochSampler(len(train_examples), cfg.seed, lengths, global_batch)
    guard = training.StepGuard(cfg.optim.max_grad_norm, cfg.optim.max_bad_steps)

    step = 0
    ckpt = run_dir.latest(warn=print if rt.is_main else None)
    if ckpt is not None:
        state = training.load_checkpoint(ckpt, rt, parts, optimizer, scheduler, precision)
        step = int(state["step"])
        sampler.load_state_dict(state["sampler"])

    tracker = Tracker(run_dir.root, "sft", total_steps, step, enabled=rt.is_main, progress_keys=("loss", "lr", "tokens_per_s"))
    tracker.message(f"sft: {len(train_examples)} train / {len(eval_examples)} held-out rows, global batch {global_batch} "
                    f"= {cfg.batch_size} x {cfg.optim.grad_accum} accum x {rt.world_size} ranks, {total_steps} steps, "
                    f"device {rt.device} ({precision.describe()}"
                    + (f", {cfg.device.distributed}" if rt.distributed else "") + ")"
                    + (f", resuming at step {step}" if step else ""))
    if adapters:
        tracker.message(f"sft: {adapters.describe()}")
    if truncated:
        tracker.message(f"sft: {truncated} training rows were longer than model.max_length={cfg.model.max_length} and were truncated")

    def evaluate() -> dict:
        with training.gathered(model):  # FSDP2: every rank gathers the weights, rank 0 evaluates
            return _evaluate() if rt.is_main else {}

    def _evaluate() -> dict:
        accuracy, samples, mean_len, _ = training.held_out_accuracy(model, tokenizer, eval_rows, eval_prompts, cfg.eval, rt.device)
        metrics = {"eval_loss": eval_loss(model, eval_examples, cfg, tokenizer.pad_token_id, rt.device),
                   "eval_response_chars": mean_len}
        if accuracy is not None:
            metrics["eval_accuracy"] = accuracy
        metrics["_samples"] = samples
        return metrics

    before = evaluate() if step == 0 else {}
    if before:
        tracker.log(0, {k: v for k, v in before.items() if not k.startswith("_")}, kind="eval")

    # ---------------------------------------------------------------- loop
    throughput = training.Throughput()
    last_eval = None  # {} on ranks other than 0
    while step < total_steps:
        indices = sampler.take(global_batch)  # every rank draws the same global batch ...
        chunks = [indices[i:i + cfg.batch_size] for i in range(0, global_batch, cfg.batch_size)]
        mine = chunks[rt.rank::rt.world_size]  # ... and takes its own micro-batches
        global_tokens = sum(len(train_examples[i].completion_ids) for i in indices)  # loss normaliser
        global_seq_tokens = sum(train_examples[i].length for i in indices)
        loss_total, padded_tokens, real_tokens = 0.0, 0, 0
        for micro, chunk in enumerate(mine):
            batch = make_batch([train_examples[i] for i in chunk], cfg, tokenizer.pad_token_id)
            padded_tokens += batch["input_ids"].numel()
            real_tokens += sum(train_examples[i].length for i in chunk)
            sync = micro == len(mine) - 1
            with training.no_sync(ddp_model, sync), precision.autocast():
                loss_sum, _ = token_loss_sum(ddp_model, batch, rt.device)
                # normalise by the global token count; DDP / FSDP average over ranks, so scale back up
                precision.backward(loss_sum * rt.world_size / global_tokens)
            loss_total += float(loss_sum.detach())
        loss_total = float(rt.all_reduce_sum(torch.tensor([loss_total], device=rt.device))) / global_tokens
        grad_norm, applied = guard.step(model.parameters(), optimizer, loss_total, scaler=precision.scaler)
        scheduler.step()
        step += 1

        if step % cfg.log_every == 0 or step == total_steps:
            tracker.log(step, {"loss": loss_total, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                               "applied": int(applied), "epoch": sampler.epoch,
                               "pad_fraction": 1 - real_tokens / padded_tokens,
                               "tokens_per_s": throughput.rate(global_seq_tokens * cfg.log_every)})
        else:
            tracker.advance(step)
        if step % cfg.eval.every == 0 or step == total_steps:
            last_eval = evaluate()
            tracker.log(step, {k: v for k, v in last_eval.items() if not k.startswith("_")}, kind="eval")
        stop = signals.stop_requested(rt)  # SIGTERM / SIGINT: checkpoint this step, then exit 143 / 130
        if step % cfg.checkpoint.every == 0 or step == total_steps or stop:  # collective; rank 0 writes
            training.save_checkpoint(run_dir, rt, step, parts, optimizer, scheduler,
                                     cfg.checkpoint.keep_last, precision, sampler=sampler.state_dict())
        rt.barrier()
        if stop and step < total_steps:
            raise signals.stopped(stop, step, total_steps, run_dir)

    # ---------------------------------------------------------------- save
    if last_eval is None:
        last_eval = evaluate()
    results = {k: v for k, v in last_eval.items() if not k.startswith("_")}
    parent = checkpoint.read_manifest(cfg.model.path)
    training.save_final(run_dir, rt, model, tokenizer, {  # collective; rank 0 writes
        "stage": "sft", "run_dir": str(run_dir.root.resolve()), "parent_model": cfg.model.path or "embedded tiny model",
        "parent_run": parent.get("run_dir"), "config": dataclasses.asdict(cfg),
        "data_fingerprint": checkpoint.fingerprint(train_rows), "steps": step, "metrics": results,
        "metrics_before": {k: v for k, v in before.items() if not k.startswith("_")}, "world_size": rt.world_size,
        **lora.manifest_entry(adapters)}, hf_model=adapters.final_model() if adapters else None)
    if rt.is_main:
        table = {}
        for key in ("eval_loss", "eval_accuracy"):
            if key in results:
                table[f"held-out {key[5:]} before"] = before.get(key, "(resumed)")
                table[f"held-out {key[5:]} after"] = results[key]
        table["steps"] = step
        table["wall time (s)"] = round(time.time() - t_start, 1)
        table["final model"] = str(run_dir.final)
        tracker.samples("held-out samples (greedy)", last_eval.get("_samples", []))
        tracker.table("sft results", table)
    tracker.close()
    return results
