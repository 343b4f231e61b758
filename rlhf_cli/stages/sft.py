"""`rlhf sft`: supervised fine-tuning, next-token loss on completion tokens only.

    rlhf sft                                             # embedded tiny model + task, CPU, ~1 min
    rlhf sft model.path=runs/base data.train=train.jsonl data.eval=eval.jsonl device=cuda
    torchrun --nproc-per-node 2 -m rlhf_cli sft          # DDP, same code path

Setup (config, devices, model, data, optimizer, resume) -> loop -> save final/.
Sequences are packed into rows of model.max_length tokens with a
block-diagonal causal mask (no attention across examples, no padding waste).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_cli import data
from rlhf_cli.engines.rollout import make_engine
from rlhf_cli.errors import DataError
from rlhf_cli.models import lora
from rlhf_cli.models import (check_generation_fits, check_models, load_trained_causal_lm, model_and_tokenizer,
                             position_limit, stop_token_ids)
from rlhf_cli.models.logprobs import completion_logprobs
from rlhf_cli.training import checkpoint, distributed, loop, memory, optim
from rlhf_cli.training.evaluation import held_out_accuracy, stage_sampled_metrics
from rlhf_cli.training.precision import Precision
from rlhf_cli.training.tracking import Throughput, Tracker


def token_loss_sum(model, batch: dict, device) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over completion tokens (labels != -100) and their count
    (logprobs.completion_logprobs: the LM head over completion positions only, in chunks)."""
    logprobs, scored = completion_logprobs(model, batch, device)
    return -logprobs.sum(), int(scored.sum())


def micro_batches(examples: list, cfg, pad_id: int, tokens: int) -> list[dict]:
    """Examples -> batches of at most `tokens` padded tokens: length-sorted padded rows, or (packing) rows of
    model.max_length packed first-fit and then grouped."""
    if cfg.packing:
        packed = data.packed_batch(examples, cfg.model.max_length, pad_id)
        per = max(1, tokens // cfg.model.max_length)
        return [{k: v[i:i + per] for k, v in packed.items()} for i in range(0, packed["input_ids"].shape[0], per)]
    groups = memory.split_by_tokens([ex.length for ex in examples], tokens)
    return [data.padded_batch([examples[i] for i in group], pad_id) for group in groups]


@torch.no_grad()
def eval_loss(model, examples, cfg, pad_id, device, tokens: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in micro_batches(examples, cfg, pad_id, tokens):
        loss, n = token_loss_sum(model, batch, device)
        total, count = total + float(loss), count + n
    model.train()
    return total / max(1, count)


class SFTRecipe:
    """setup (data, model, optimizer, resume) -> train (train_step, then the end-of-step tail) -> save final/.
    One step: a global batch of packed (or length-bucketed) rows, split into micro-batches per rank."""

    def __init__(self, cfg, rt, run_dir, t_start: float):
        self.cfg, self.rt, self.run_dir, self.t_start = cfg, rt, run_dir, t_start

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, rt = self.cfg, self.rt
        check_models("sft", cfg)  # a model dir of the right kind (from its config.json), before anything loads
        self.path, self.tokenizer = model_and_tokenizer(cfg.model, "model", self.run_dir.root, cfg.seed, rt)
        check_generation_fits(self.path, {"eval.max_new_tokens": cfg.eval.max_new_tokens})  # before any weights
        self._setup_data()
        self.global_batch, self.total_steps = loop.batch_plan(cfg, rt, len(self.train_examples))
        longest = cfg.model.max_length if cfg.packing else max(ex.length for ex in self.train_examples + self.eval_examples)
        self.memory = memory.plan("micro_batch_tokens", cfg.micro_batch_tokens, rt.device, [(self.path, True)], [],
                                  longest, cfg.model.dtype, cfg.model.gradient_checkpointing, cfg.lora.r > 0,
                                  cfg.model.trust_remote_code)  # before any weights load
        self._setup_model()
        self.optimizer, self.scheduler, self.guard = optim.build(self.model.parameters(), cfg.optim, self.total_steps)
        lengths = None if cfg.packing else [ex.length for ex in self.train_examples]  # bucket when padding
        self.sampler = data.EpochSampler(len(self.train_examples), cfg.seed, lengths, self.global_batch)
        self.step = loop.resume(self.run_dir, rt, self.parts, self.optimizer, self.scheduler, self.precision,
                                sampler=self.sampler, guard=self.guard)
        self._announce()

    def _setup_data(self) -> None:
        cfg, tokenizer = self.cfg, self.tokenizer
        self.train_rows, self.eval_rows = data.stage_rows(cfg.data, "sft", cfg.seed)
        stop_ids = stop_token_ids(tokenizer, self.path)  # a chat turn's end-of-turn token is kept as its stop
        self.train_examples, self.truncated = data.tokenize_sft(tokenizer, self.train_rows, cfg.model.max_length,
                                                                "data.train", stop_ids)
        self.eval_examples, _ = data.tokenize_sft(tokenizer, self.eval_rows, cfg.model.max_length, "data.eval", stop_ids)
        if not self.train_examples:
            raise DataError("data.train has no usable rows")
        self.eval_prompts = [data.split_sft_row(tokenizer, r, i, "data.eval")[0] for i, r in enumerate(self.eval_rows)]

    def _setup_model(self) -> None:
        cfg, rt = self.cfg, self.rt
        self.precision = Precision(cfg.model.dtype, cfg.device.autocast, rt.device)
        model, self.adapters, self.parts = load_trained_causal_lm(self.path, cfg.model, cfg.lora, self.precision.weights,
                                                                  rt, self.run_dir.root)  # lora.r > 0: adapters only
        model.train()
        self.model = model
        self.ddp_model = distributed.wrap_model(model, rt, cfg.device.distributed)  # before the optimizer (FSDP2)
        self.engine = make_engine("auto", model, self.tokenizer, memory=self.memory)  # held-out generation
        self.max_sequence = min(cfg.model.max_length, position_limit(self.path) or cfg.model.max_length)

    def _announce(self) -> None:
        cfg, rt, step = self.cfg, self.rt, self.step
        self.tracker = Tracker(self.run_dir.root, "sft", self.total_steps, step, enabled=rt.is_main,
                               progress_keys=("loss", "lr", "tokens_per_s"))
        self.tracker.message(
            f"sft: {len(self.train_examples)} train / {len(self.eval_examples)} held-out rows, global batch "
            f"{self.global_batch} = {cfg.batch_size} x {cfg.optim.grad_accum} accum x {rt.world_size} ranks, "
            f"{self.total_steps} steps, device {rt.device} ({self.precision.describe()}"
            + (f", {cfg.device.distributed}" if rt.distributed else "") + ")"
            + (f", resuming at step {step}" if step else ""))
        loop.announce_plan("sft", self.tracker.message, self)
        if self.truncated:
            self.tracker.message(f"sft: {self.truncated} training rows were longer than model.max_length="
                                 f"{cfg.model.max_length} and were truncated")

    # ---------------------------------------------------------------- train
    def train(self) -> dict:
        before = loop.evaluate_before(self)
        self.throughput = Throughput()
        return self.save(loop.train_steps(self), before)

    def train_step(self) -> dict:
        """One optimizer step over a global batch (this rank's micro-batches, accumulated) -> its metrics."""
        cfg, rt, examples, pad_id = self.cfg, self.rt, self.train_examples, self.tokenizer.pad_token_id
        indices = self.sampler.take(self.global_batch)  # every rank draws the same global batch ...
        chunks = [indices[i:i + cfg.batch_size] for i in range(0, self.global_batch, cfg.batch_size)]
        mine = [i for chunk in chunks[rt.rank::rt.world_size] for i in chunk]  # ... and takes its own rows
        global_tokens = sum(len(examples[i].completion_ids) for i in indices)  # loss normaliser
        global_seq_tokens = sum(examples[i].length for i in indices)
        loss_total, padded_tokens = 0.0, 0
        real_tokens = sum(examples[i].length for i in mine)
        batches = memory.same_count_everywhere(rt, self.ddp_model, micro_batches([examples[i] for i in mine], cfg,
                                                                                pad_id, self.memory.tokens))
        for micro, (batch, counts) in enumerate(batches):
            padded_tokens += batch["input_ids"].numel() if counts else 0
            sync = micro == len(batches) - 1
            with distributed.no_sync(self.ddp_model, sync), self.precision.autocast():
                loss_sum, _ = token_loss_sum(self.ddp_model, batch, rt.device)
                loss_sum = loss_sum if counts else loss_sum * 0.0  # FSDP2: a forward to match another rank's
                # normalise by the global token count; DDP / FSDP average over ranks, so scale back up
                self.precision.backward(loss_sum * rt.world_size / global_tokens)
            loss_total += float(loss_sum.detach())
        loss_total = float(rt.all_reduce_sum(torch.tensor([loss_total], device=rt.device))) / global_tokens
        grad_norm, applied = self.guard.step(self.model.parameters(), self.optimizer, loss_total,
                                             scaler=self.precision.scaler, at_step=self.step + 1)
        self.scheduler.step()
        self.step += 1
        logged = self.step % cfg.log_every == 0 or self.step == self.total_steps
        return {"loss": loss_total, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "applied": int(applied), "epoch": self.sampler.epoch, "pad_fraction": 1 - real_tokens / padded_tokens,
                # the rate over the steps since the last logged one (a log every log_every steps)
                "tokens_per_s": self.throughput.rate(global_seq_tokens * cfg.log_every) if logged else None}

    def evaluate(self) -> loop.Evaluation:
        with distributed.gathered(self.model):  # FSDP2: every rank gathers the weights, rank 0 evaluates
            if not self.rt.is_main:
                return loop.Evaluation({})
            cfg, rt = self.cfg, self.rt
            accuracy, samples, mean_len, _ = held_out_accuracy(self.engine, self.tokenizer, self.eval_rows,
                                                               self.eval_prompts, cfg.eval, rt.device,
                                                               self.max_sequence)
            metrics = {"eval_loss": eval_loss(self.model, self.eval_examples, cfg, self.tokenizer.pad_token_id, rt.device,
                                              self.memory.infer_tokens),
                       "eval_response_chars": mean_len}
            if accuracy is not None:
                metrics["eval_accuracy"] = accuracy
            metrics |= stage_sampled_metrics(self.engine, self.tokenizer, self.eval_rows, self.eval_prompts, cfg.eval,
                                             rt.device, cfg.seed, self.max_sequence)  # eval.samples=K: pass@k, maj@k
            return loop.Evaluation(metrics, samples)

    def save_checkpoint(self) -> None:
        loop.save_checkpoint(self)

    # ---------------------------------------------------------------- save
    def save(self, last: loop.Evaluation, before: loop.Evaluation) -> dict:
        rt, run_dir = self.rt, self.run_dir
        manifest = loop.final_manifest(self, "sft", last, before) | lora.manifest_entry(self.adapters)
        checkpoint.save_final(run_dir, rt, self.model, self.tokenizer, manifest,  # collective; rank 0 writes
                              hf_model=self.adapters.final_model() if self.adapters else None)
        results = last.metrics
        table = loop.before_after(results, before.metrics, {"eval_loss": "loss", "eval_accuracy": "accuracy"})
        loop.report("sft", rt, self.tracker, run_dir, table, self.step, self.t_start, "held-out samples (greedy)",
                    last.samples)
        return results


def run(cfg, output_dir: Path) -> dict:
    return loop.run_stage("sft", cfg, output_dir, SFTRecipe)
