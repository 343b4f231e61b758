"""`rlhf rl`: REINFORCE, A2C and PPO against reward models and rule-based rewards.

    rlhf rl policy.path=runs/sft/final                                   # REINFORCE, rule reward
    rlhf rl algorithm=ppo policy.path=runs/sft/final reward=rm reward.model.path=runs/rm/final
    rlhf rl -m algorithm=reinforce,a2c,ppo seed=1,2,3                    # a sweep, a dir per job
    torchrun --nproc-per-node 2 -m rlhf_cli rl device=cpu                # DDP over 2 ranks, same code path

The three algorithms share one loop and differ in the advantage estimator and
the loss (shared/ALGORITHMS.md). Each iteration: 1 rollout, 2 score,
3 advantages, 4 update, 5 log and checkpoint. Every model runs in eval mode
(dropout off); only the policy (and critic) receive gradients.

Under torchrun the ranks split the step's prompts (rank r takes prompts
r*P/W..(r+1)*P/W-1 of the global draw), never the K samples of one prompt,
so rloo / group_norm groups are whole on every rank. Token t of global
rollout row g is drawn with noise keyed by (seed, step, g): ranks sample
differently, reruns and resumes sample the same, and W ranks x B rows draw
what one process with W*B rows draws. Everything computed across rows is
global: the running-mean baseline, advantage whitening, the loss (normalised
by the minibatch's token count over all ranks), the KL controller, PPO's
early stop and the logged metrics.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from rlhf_cli import algorithms as algo
from rlhf_cli import checkpoint, data, lora, runtime, signals, training
from rlhf_cli.checkpoint import RunDir
from rlhf_cli.config import KL_COEF_RULES_ONLY, KL_COEF_WITH_RM
from rlhf_cli.errors import UserError
from rlhf_cli.modeling import (PolicyWithValueHead, Rollout, decode_responses, load_causal_lm,
                               load_scalar_head_model, load_tokenizer, response_logprobs, sample, score_texts,
                               token_values)
from rlhf_cli.rewards import call_reward, import_reward_function
from rlhf_cli.tracking import Tracker


class TokenValues(torch.nn.Module):
    """token_values as a module, so a DDP / FSDP2 wrapper's forward (and gradient sync) runs it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return token_values(self.model, input_ids, attention_mask)  # (B, L)


def frozen(model):
    model.eval()
    model.requires_grad_(False)
    return model


def check_same_tokenizer(tok_a, tok_b, what: str) -> None:
    probe = "Solve 12+3 = ? The answer: 15.\n<eos> ünïcode"
    if tok_a.get_vocab() != tok_b.get_vocab() or tok_a(probe)["input_ids"] != tok_b(probe)["input_ids"]:
        raise UserError(f"{what} uses a different tokenizer from the policy; train it from the same base model")


def char_to_token_ends(tokenizer, response_ids: list[int]) -> list[int]:
    """Decoded text length after each token (to place process rewards on step ends)."""
    return [len(tokenizer.decode(response_ids[: t + 1], skip_special_tokens=True)) for t in range(len(response_ids))]


def run(cfg, output_dir: Path) -> dict:
    t_start = time.time()
    training.check_trainable_dtype(cfg.policy, "policy", cfg.placement.policy or cfg.device.type)
    rt = runtime.setup(cfg.device, cfg.seed, cfg.placement)  # every placement resolved before anything loads
    run_dir = RunDir(output_dir, dataclasses.asdict(cfg), "rl", rt.is_main)
    try:
        return _train(cfg, rt, run_dir, t_start)
    finally:
        run_dir.release()
        runtime.teardown()


def _train(cfg, rt, run_dir: RunDir, t_start: float) -> dict:
    # ---------------------------------------------------------------- setup: reward sources first (cheap to fail)
    reward_fns = [(name, import_reward_function(name)) for name in cfg.reward.functions]
    policy_path = training.model_path(cfg.policy, run_dir.root, cfg.seed, rt)
    dev_policy, dev_ref, dev_reward, dev_critic = (rt.placement[k] for k in ("policy", "reference", "reward", "critic"))
    precision = training.Precision(cfg.policy.dtype, cfg.device.autocast, dev_policy)
    # ranks split the prompts, never a prompt's K samples (whole rloo / group_norm groups on every rank)
    if rt.world_size > cfg.rollout.prompts_per_step or cfg.rollout.prompts_per_step % rt.world_size:
        raise UserError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple of the "
                        f"world size {rt.world_size} (each rank samples whole groups)")
    prompts_per_rank = cfg.rollout.prompts_per_step // rt.world_size
    K = cfg.rollout.samples_per_prompt
    rows_per_rank = prompts_per_rank * K
    if rows_per_rank % cfg.algorithm.minibatches:
        raise UserError(f"algorithm.minibatches={cfg.algorithm.minibatches} does not divide the {rows_per_rank} "
                        f"rollout rows of each of the {rt.world_size} ranks (rollout.prompts_per_step / world size "
                        f"x rollout.samples_per_prompt); choose a divisor")

    tokenizer = load_tokenizer(policy_path, "policy.path", cfg.policy.trust_remote_code)
    train_rows, eval_rows = data.stage_rows(cfg.data, "prompts", cfg.seed)
    # a `prompt` column (text or messages) or a `messages` conversation without its last assistant turn
    train_prompts = [data.prompt_text(tokenizer, r, i, "data.train") for i, r in enumerate(train_rows)]
    eval_prompts = [data.prompt_text(tokenizer, r, i, "data.eval") for i, r in enumerate(eval_rows)]
    train_prompt_ids = [data.encode(tokenizer, p)[-cfg.policy.max_length:] for p in train_prompts]

    policy = load_causal_lm(policy_path, "policy.path", precision.weights, dev_policy, cfg.policy.trust_remote_code)
    if cfg.policy.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    adapters = lora.attach(policy, cfg.lora, "CAUSAL_LM", policy_path, run_dir.root, rt)  # lora.r > 0: only adapters train
    policy.eval()  # dropout off during RL (checklist 1); gradients still flow
    # the reference computes like the policy (same weights dtype and autocast): KL is exactly 0 at the start
    if adapters is not None and not cfg.reference.path:  # LoRA: the policy itself with its adapters off, no copy
        reference = adapters.adapters_off()
    else:
        reference = frozen(load_causal_lm(cfg.reference.path or policy_path, "reference.path", precision.weights, dev_ref,
                                          cfg.policy.trust_remote_code))
    if cfg.reference.path:
        check_same_tokenizer(tokenizer, load_tokenizer(cfg.reference.path, "reference.path"), "reference.path")
    reward_model, rm_mean, rm_std = None, 0.0, 1.0
    if cfg.reward.model.path:
        check_same_tokenizer(tokenizer, load_tokenizer(cfg.reward.model.path, "reward.model.path"), "reward.model.path")
        reward_model = frozen(load_scalar_head_model(cfg.reward.model.path, "reward.model.path", cfg.reward.model.dtype,
                                                     dev_reward))  # frozen: eval mode, no grad, used under no_grad
        rm_manifest = checkpoint.read_manifest(cfg.reward.model.path)
        if cfg.reward.model.normalize and "score_std" in rm_manifest:
            rm_mean, rm_std = float(rm_manifest["score_mean"]), max(float(rm_manifest["score_std"]), 1e-6)
    critic, shared = None, None  # critic: the value parameters; shared: the policy with a value head on it
    if cfg.algorithm.needs_critic and cfg.critic.init == "shared":  # one forward and backward for both
        shared = PolicyWithValueHead(policy)
        critic = shared.v_head
    elif cfg.algorithm.needs_critic:
        critic_path = cfg.critic.path or (cfg.reward.model.path if cfg.critic.init == "reward" and cfg.reward.model.path
                                          else policy_path)
        critic = TokenValues(load_scalar_head_model(critic_path, "critic.path", precision.weights, dev_critic))
        critic.eval()
    # before the optimizer: FSDP2 shards in place (DDP wraps); rollouts use the unwrapped modules
    ddp_policy = training.wrap_model(shared or policy, rt, cfg.device.distributed)
    ddp_critic = (training.wrap_model(critic, rt, cfg.device.distributed)
                  if critic is not None and shared is None else None)
    parts = ({"policy": (adapters.state if adapters else policy, "")}  # LoRA: checkpoints hold the adapters only
             | ({"critic": (critic, "" if shared else "model.")} if critic is not None else {}))
    held = lora.parameters_held({"policy": policy, "reference": reference, "reward_model": reward_model, "critic": critic})

    groups = [{"params": [p for p in policy.parameters() if p.requires_grad]}]  # LoRA: the adapters
    if critic is not None:
        groups.append({"params": list(critic.parameters()), "lr": cfg.critic.lr or cfg.optim.lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    scheduler = training.build_scheduler(optimizer, cfg.optim, cfg.max_steps)
    guard = training.StepGuard(cfg.optim.max_grad_norm, cfg.optim.max_bad_steps)
    kl_ctl = (algo.AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.target
              else algo.FixedKLController(cfg.kl.coef))
    running_mean = training.GlobalRunningMean(rt)  # the 'mean' baseline over every rank's rows
    sampler = data.EpochSampler(len(train_rows), cfg.seed)  # the same global draw on every rank

    step = 0
    ckpt = run_dir.latest(warn=print if rt.is_main else None)
    if ckpt is not None:
        state = training.load_checkpoint(ckpt, rt, parts, optimizer, scheduler, precision)
        step = int(state["step"])
        sampler.load_state_dict(state["sampler"])
        kl_ctl.load_state_dict(state["kl"])
        running_mean.load_state_dict(state["running_mean"])

    tracker = Tracker(run_dir.root, "rl", cfg.max_steps, step, enabled=rt.is_main,
                      progress_keys=("score", "kl", "response_len", "samples_per_s"))
    tracker.message(f"rl: {cfg.algorithm.name} ({cfg.algorithm.advantage}"
                    f"{', baseline ' + cfg.algorithm.baseline if cfg.algorithm.advantage == 'reinforce' else ''}), "
                    f"{cfg.rollout.prompts_per_step} prompts x {K} samples per step over {rt.world_size} rank(s), "
                    f"rewards: {', '.join([n for n, _ in reward_fns] + (['reward model'] if reward_model else []))}"
                    + (f"; resuming at step {step}" if step else ""))
    tracker.message(f"rl: global batch {cfg.rollout.prompts_per_step * K} = {rows_per_rank} ({prompts_per_rank} "
                    f"prompts x {K} samples) x 1 accum x {rt.world_size} ranks, {cfg.algorithm.minibatches} minibatch(es) x "
                    f"{cfg.algorithm.epochs} epoch(s) per rollout, policy on {dev_policy} ({precision.describe()}"
                    + (f", {cfg.device.distributed}" if rt.distributed else "") + ")")
    tracker.message(f"rl: {held['total']:,} parameters in memory ({held['trainable']:,} train): "
                    + ", ".join(f"{k} {v:,}" for k, v in held.items() if k not in ("total", "trainable"))
                    + (f"; {adapters.describe()}" if adapters else "")
                    + ("; reference = the policy with adapters off" if isinstance(reference, lora.AdaptersOff) else ""))
    if cfg.kl.coef in (KL_COEF_RULES_ONLY, KL_COEF_WITH_RM):
        tracker.message(f"rl: kl.coef {cfg.kl.coef} ({'a reward model is in the reward' if reward_model is not None else 'rule rewards alone'}"
                        f"; the default by reward source unless set)")
    if cfg.rollout.top_k or cfg.rollout.top_p:
        tracker.message("rl: top-k/top-p sampling biases the KL estimate (log-probs are of the unfiltered policy)")

    def score_rollout(rollout: Rollout, prompts: list[str], rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """-> (scores (B,), step rewards (B, T), stats): rules + reward model + no-stop penalty."""
        texts = decode_responses(tokenizer, rollout)
        B, T = rollout.response_ids.shape
        scores = torch.zeros(B)
        step_values, step_positions = [[] for _ in range(B)], [[] for _ in range(B)]
        rule_total = torch.zeros(B)
        lengths = rollout.response_mask.sum(-1).long().tolist()
        for b, (prompt, text, row) in enumerate(zip(prompts, texts, rows)):
            for name, fn in reward_fns:
                value = call_reward(fn, name, prompt, text, row)
                if isinstance(value, float):
                    scores[b] += cfg.reward.function_weight * value
                    rule_total[b] += value
                    continue
                ends = char_to_token_ends(tokenizer, rollout.response_ids[b, :lengths[b]].tolist())
                for end_char, v in value:  # process reward: on the token holding the step's last char
                    t = next((i for i, e in enumerate(ends) if e >= end_char), lengths[b] - 1)
                    step_values[b].append(cfg.reward.function_weight * v)
                    step_positions[b].append(t)
                    rule_total[b] += v
        stats = {"rule_reward": rule_total.mean()} if reward_fns else {}
        if reward_model is not None:
            # the response's text re-tokenized with its prompt, as train-rm trained and any client scores
            rm = (score_texts(reward_model, tokenizer, prompts, texts, dev_reward) - rm_mean) / rm_std
            scores += cfg.reward.model.weight * rm
            stats["rm_score"] = rm.mean()
        scores += cfg.reward.no_stop_penalty * (~rollout.stopped.cpu()).float()
        step_rewards = algo.place_step_rewards(step_values, step_positions, (B, T), dtype=torch.float32)
        return scores.to(dev_policy), step_rewards.to(dev_policy), stats

    def evaluate() -> dict:
        with training.gathered(policy):  # FSDP2: every rank gathers the weights, rank 0 evaluates
            return _evaluate() if rt.is_main else {}

    def _evaluate() -> dict:
        accuracy, samples, mean_len, responses = training.held_out_accuracy(
            policy, tokenizer, eval_rows, eval_prompts, cfg.eval, dev_policy, cfg.rollout.engine)
        metrics = {"eval_response_chars": mean_len, "_samples": samples}
        if accuracy is not None:
            metrics["eval_accuracy"] = accuracy
        if reward_model is not None:  # the RM's (normalised) score of the greedy held-out responses
            rm_scores = score_texts(reward_model, tokenizer, eval_prompts, responses, dev_reward)
            metrics["eval_rm_score"] = float(((rm_scores - rm_mean) / rm_std).mean())
        return metrics

    def forward(ids: torch.Tensor, attn: torch.Tensor, P: int, with_entropy: bool = True):
        """Policy (and critic) over rollout rows of prompt width P -> (log-probs, entropies or None, values
        or None), each (B, T); with gradients unless under no_grad (entropies only where the loss uses them)."""
        entropy_grad = cfg.algorithm.entropy_coef != 0
        if shared is not None:  # one forward for both
            return ddp_policy(ids, attn, P, cfg.rollout.temperature, with_entropy, entropy_grad)
        out = response_logprobs(ddp_policy, ids, attn, P, cfg.rollout.temperature, with_entropy, entropy_grad)
        logprobs, entropy = out if with_entropy else (out, None)
        values = (ddp_critic(ids.to(dev_critic), attn.to(dev_critic))[:, P - 1:-1].to(dev_policy)
                  if ddp_critic is not None else None)
        return logprobs, entropy, values

    before = evaluate() if step == 0 else {}
    if before:
        tracker.log(0, {k: v for k, v in before.items() if not k.startswith("_")}, kind="eval")

    last_eval = None  # {} on ranks other than 0
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        # ------------------------------------------------------------ 1. rollout
        chosen = sampler.take(cfg.rollout.prompts_per_step)[rt.rank * prompts_per_rank:(rt.rank + 1) * prompts_per_rank]
        rows = [train_rows[i] for i in chosen for _ in range(K)]  # K contiguous samples per prompt
        prompts = [train_prompts[i] for i in chosen for _ in range(K)]
        prompt_ids, prompt_mask = data.left_pad([train_prompt_ids[i] for i in chosen for _ in range(K)],
                                                tokenizer.pad_token_id)
        noise = runtime.keyed_uniform(cfg.seed, step, rt.rank * rows_per_rank, len(rows), cfg.rollout.max_new_tokens,
                                      dev_policy)  # (B, T): row g of the global batch draws with its own noise
        with training.gathered(policy), precision.autocast():  # FSDP2: ranks stop sampling at different lengths
            rollout = sample(policy, prompt_ids.to(dev_policy), prompt_mask.to(dev_policy), cfg.rollout.max_new_tokens,
                             tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.rollout.temperature,
                             top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p, noise=noise, engine=cfg.rollout.engine)
        input_ids, attention_mask, mask = rollout.input_ids, rollout.attention_mask, rollout.response_mask
        P = prompt_ids.shape[1]
        t1 = time.perf_counter()

        # ------------------------------------------------------------ 2. score (+ reference, old log-probs, values)
        scores, step_rewards, score_stats = score_rollout(rollout, prompts, rows)
        with torch.no_grad(), precision.autocast():
            logprobs_ref = response_logprobs(reference, input_ids.to(dev_ref), attention_mask.to(dev_ref), P,
                                             cfg.rollout.temperature).to(dev_policy)
        a = cfg.algorithm
        single_pass = a.epochs == 1 and a.minibatches == 1
        if single_pass:  # one update over every row: its own forward gives the old log-probs and values,
            with precision.autocast():  # detached: the numbers a separate no-grad forward computes, one forward fewer
                update_forward = forward(input_ids, attention_mask, P)
            logprobs_old, _, values_old = (t.detach() if t is not None else None for t in update_forward)
        else:
            with torch.no_grad(), precision.autocast():
                logprobs_old, _, values_old = forward(input_ids, attention_mask, P, with_entropy=False)
        values_old = values_old * mask if values_old is not None else None
        kl_per_token = algo.kl_k1(logprobs_old, logprobs_ref) * mask
        t2 = time.perf_counter()

        # ------------------------------------------------------------ 3. advantages
        beta = kl_ctl.value
        kl_in_reward = kl_per_token if cfg.kl.estimator == "k1" else torch.zeros_like(kl_per_token)
        rewards = algo.token_rewards(scores, kl_in_reward, mask, beta, step_rewards)
        if a.advantage == "reinforce":
            advantages, returns = algo.reinforce_advantages(rewards, mask, a.gamma, a.baseline, K, running_mean,
                                                            scores=scores)
        elif a.advantage == "gae":
            advantages, returns = algo.gae(rewards, values_old, mask, a.gamma, a.lam)
        else:
            advantages, returns = algo.nstep_advantages(rewards, values_old, mask, a.gamma, a.nstep)
        if a.whiten_advantages:  # mean and variance over the real tokens of every rank's rows
            advantages = training.global_masked_whiten(advantages, mask, rt)

        # ------------------------------------------------------------ 4. update
        update_stats: dict[str, list[float]] = {}
        first_mb: dict[str, float] = {}
        n_rows = input_ids.shape[0]  # this rank's rows
        mb_size = n_rows // a.minibatches
        params = [p for group in optimizer.param_groups for p in group["params"]]  # FSDP2: the sharded ones
        stop_early = False
        for epoch in range(a.epochs):
            # each rank shuffles its own rows: minibatch m of the step is the union of the ranks' minibatch m
            order = (torch.arange(n_rows) if single_pass else
                     torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed + step * 997 + epoch)))
            for m in range(a.minibatches):
                idx = order[m * mb_size:(m + 1) * mb_size].to(dev_policy)
                mb_mask = mask[idx]
                mb_tokens = float(mb_mask.sum())
                (all_tokens,) = rt.sum(mb_tokens)
                # DDP averages the ranks' gradients: weighting each rank's token mean by its share of the
                # minibatch's tokens (1 on one process) makes the loss the mean over every rank's tokens
                share = mb_tokens * rt.world_size / max(all_tokens, 1.0)
                if single_pass:
                    logprobs, entropy, values = update_forward
                else:
                    with precision.autocast():
                        logprobs, entropy, values = forward(input_ids[idx], attention_mask[idx], P)
                if a.name == "ppo":
                    pg_loss, pg_stats = algo.ppo_policy_loss(logprobs, logprobs_old[idx], advantages[idx], mb_mask,
                                                             a.clip_low, a.clip_high)
                    if epoch == 0 and m == 0:  # checklist 2: ratio 1, clip 0, approx-KL 0 before any update
                        ratio_dev = ((logprobs.detach() - logprobs_old[idx]).exp() - 1).abs() * mb_mask
                        first_mb = {"first_mb_ratio_dev": float(ratio_dev.max())}  # this rank's rows
                else:
                    pg_loss = algo.policy_gradient_loss(logprobs, advantages[idx], mb_mask)
                    pg_stats = {}
                entropy_mean = algo.masked_mean(entropy, mb_mask)
                loss = pg_loss - a.entropy_coef * entropy_mean
                if cfg.kl.estimator == "k3":
                    loss = loss + beta * algo.masked_mean(algo.kl_k3(logprobs, logprobs_ref[idx]), mb_mask)
                stats = {"loss": loss, "entropy": entropy_mean, **pg_stats}
                if values is not None:
                    v_loss = algo.value_loss(values, values_old[idx], returns[idx], mb_mask,
                                             a.value_clip if a.name == "ppo" else None)
                    loss = loss + a.value_coef * v_loss
                    stats.update(loss=loss, value_loss=v_loss)
                precision.backward(loss * share)
                # token means over every rank (one all-reduce): the guard, early stop and logs agree on all ranks
                sums = rt.sum(*(float(v.detach()) * mb_tokens for v in stats.values()))
                means = {k: s / max(all_tokens, 1.0) for k, s in zip(stats, sums)}
                grad_norm, applied = guard.step(params, optimizer, means["loss"], scaler=precision.scaler)
                for k, v in {**means, "grad_norm": grad_norm}.items():
                    update_stats.setdefault(k, []).append(v)
                if a.name == "ppo" and epoch == 0 and m == 0:
                    first_mb.update(first_mb_clip_frac=means["clip_frac"], first_mb_approx_kl=means["approx_kl"])
                if a.name == "ppo" and a.target_kl is not None and means["approx_kl"] > a.target_kl:
                    stop_early = True
                    break
            if stop_early:
                break
        scheduler.step()
        step += 1
        t3 = time.perf_counter()

        # ------------------------------------------------------------ 5. log and checkpoint
        # per-row means over every rank's rows (one all-reduce); the KL controller sees the global KL
        # groups whose K outcome totals (score + process rewards) are all equal: no signal for a group baseline
        outcome = (scores + step_rewards.sum(-1)).view(-1, K)  # (prompts, K)
        flat_groups = float((outcome.max(1).values - outcome.min(1).values <= 1e-6).sum()) * K
        row_sums = {"score": float(scores.sum()), **{k: float(v) * n_rows for k, v in score_stats.items()},
                    "zero_signal_group_frac": flat_groups,
                    "reward_with_kl": float(rewards.sum()), "kl": float(algo.masked_sum(kl_per_token, mask)),
                    "response_len": float(mask.sum()), "stop_fraction": float(rollout.stopped.float().sum())}
        all_rows, *totals = rt.sum(n_rows, *row_sums.values())
        row_means = {k: total / all_rows for k, total in zip(row_sums, totals)}
        kl_ctl.update(row_means["kl"], int(all_rows))
        metrics = {
            **row_means, "kl_coef": beta,
            **{k: sum(v) / len(v) for k, v in update_stats.items()}, **first_mb,
            "samples_per_s": all_rows / (t3 - t0),
            "tokens_per_s": row_means["response_len"] * all_rows / (t3 - t0),
            "time_rollout_frac": (t1 - t0) / (t3 - t0), "time_score_frac": (t2 - t1) / (t3 - t0),
            "time_update_frac": (t3 - t2) / (t3 - t0), "lr": scheduler.get_last_lr()[0], "early_stop": int(stop_early),
        }
        if values_old is not None:
            metrics["explained_variance"] = training.global_explained_variance(values_old, returns, mask, rt)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            tracker.log(step, metrics)
        if step % cfg.eval.every == 0 or step == cfg.max_steps:
            last_eval = evaluate()
            tracker.log(step, {k: v for k, v in last_eval.items() if not k.startswith("_")}, kind="eval")
        stop = signals.stop_requested(rt)  # SIGTERM / SIGINT: checkpoint this step, then exit 143 / 130
        if step % cfg.checkpoint.every == 0 or step == cfg.max_steps or stop:  # collective; rank 0 writes
            training.save_checkpoint(run_dir, rt, step, parts, optimizer, scheduler, cfg.checkpoint.keep_last,
                                     precision, sampler=sampler.state_dict(), kl=kl_ctl.state_dict(),
                                     running_mean=running_mean.state_dict())
        rt.barrier()
        if stop and step < cfg.max_steps:
            raise signals.stopped(stop, step, cfg.max_steps, run_dir)

    # ---------------------------------------------------------------- save
    if last_eval is None:
        last_eval = evaluate()
    results = {k: v for k, v in last_eval.items() if not k.startswith("_")}
    policy_manifest = checkpoint.read_manifest(cfg.policy.path)
    rm_manifest = checkpoint.read_manifest(cfg.reward.model.path)
    training.save_final(run_dir, rt, policy, tokenizer, {  # collective; rank 0 writes
            "stage": "rl", "run_dir": str(run_dir.root.resolve()), "algorithm": cfg.algorithm.name,
            "parent_model": cfg.policy.path or "embedded tiny model", "sft_run": policy_manifest.get("run_dir"),
            "reward_model": cfg.reward.model.path, "rm_run": rm_manifest.get("run_dir"),
            "reward_functions": list(cfg.reward.functions), "config": dataclasses.asdict(cfg),
            "data_fingerprint": checkpoint.fingerprint(train_rows), "steps": step, "metrics": results,
            "metrics_before": {k: v for k, v in before.items() if not k.startswith("_")}, "world_size": rt.world_size,
            "parameters_held": held, **lora.manifest_entry(adapters)}, hf_model=adapters.final_model() if adapters else None)
    if rt.is_main:
        table = {}
        if "eval_accuracy" in results:
            table["held-out accuracy before"] = before.get("eval_accuracy", "(resumed)")
            table["held-out accuracy after"] = results["eval_accuracy"]
        table["algorithm"] = cfg.algorithm.name
        table["steps"] = step
        table["wall time (s)"] = round(time.time() - t_start, 1)
        table["final model"] = str(run_dir.final)
        tracker.samples("held-out samples (greedy)", last_eval.get("_samples", []))
        tracker.table("rl results", table)
    tracker.close()
    return results
