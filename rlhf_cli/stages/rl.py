"""`rlhf rl`: REINFORCE, A2C and PPO against reward models and rule-based rewards.

    rlhf rl policy.path=runs/sft/final                                   # REINFORCE, rule reward
    rlhf rl algorithm=ppo policy.path=runs/sft/final reward=rm reward.model.path=runs/rm/final
    rlhf rl -m algorithm=reinforce,a2c,ppo seed=1,2,3                    # a sweep, a dir per job

The three algorithms share one loop and differ in the advantage estimator and
the loss (shared/ALGORITHMS.md). Each iteration: 1 rollout, 2 score,
3 advantages, 4 update, 5 log and checkpoint. Every model runs in eval mode
(dropout off); only the policy (and critic) receive gradients.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from rlhf_cli import algorithms as algo
from rlhf_cli import checkpoint, data, runtime, training
from rlhf_cli.checkpoint import RunDir
from rlhf_cli.errors import DataError, UserError
from rlhf_cli.modeling import (Rollout, decode_responses, last_token_scores, load_causal_lm, load_scalar_head_model,
                               load_tokenizer, response_logprobs, sample, score_texts, token_values)
from rlhf_cli.rewards import call_reward, import_reward_function
from rlhf_cli.tracking import Tracker


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
    training.check_trainable_dtype(cfg.policy, "policy")
    rt = runtime.setup(cfg.device, cfg.seed)
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
    place = cfg.placement
    dev_policy = runtime.resolve_device(place.policy, rt.device, rt.local_rank) if place.policy else rt.device
    dev_ref = runtime.resolve_device(place.reference, dev_policy, rt.local_rank)
    dev_reward = runtime.resolve_device(place.reward, dev_policy, rt.local_rank)
    dev_critic = runtime.resolve_device(place.critic, dev_policy, rt.local_rank)

    tokenizer = load_tokenizer(policy_path, "policy.path", cfg.policy.trust_remote_code)
    train_rows, eval_rows = data.stage_rows(cfg.data, "prompts", cfg.seed)
    for key, rows in (("data.train", train_rows), ("data.eval", eval_rows)):
        for i, row in enumerate(rows):
            if row.get("prompt") in (None, "", []):
                raise DataError(f"{key}: row {i} has no prompt; rl needs a `prompt` column")
    train_prompts = [data.render_prompt(tokenizer, r["prompt"]) for r in train_rows]
    eval_prompts = [data.render_prompt(tokenizer, r["prompt"]) for r in eval_rows]
    train_prompt_ids = [data.encode(tokenizer, p)[-cfg.policy.max_length:] for p in train_prompts]

    policy = load_causal_lm(policy_path, "policy.path", cfg.policy.dtype, dev_policy, cfg.policy.trust_remote_code)
    if cfg.policy.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.eval()  # dropout off during RL (checklist 1); gradients still flow
    reference = frozen(load_causal_lm(cfg.reference.path or policy_path, "reference.path", cfg.policy.dtype, dev_ref,
                                      cfg.policy.trust_remote_code))
    if cfg.reference.path:
        check_same_tokenizer(tokenizer, load_tokenizer(cfg.reference.path, "reference.path"), "reference.path")
    reward_model, rm_mean, rm_std = None, 0.0, 1.0
    if cfg.reward.model.path:
        check_same_tokenizer(tokenizer, load_tokenizer(cfg.reward.model.path, "reward.model.path"), "reward.model.path")
        reward_model = frozen(load_scalar_head_model(cfg.reward.model.path, "reward.model.path", "fp32", dev_reward))
        rm_manifest = checkpoint.read_manifest(cfg.reward.model.path)
        if cfg.reward.model.normalize and "score_std" in rm_manifest:
            rm_mean, rm_std = float(rm_manifest["score_mean"]), max(float(rm_manifest["score_std"]), 1e-6)
    critic = None
    if cfg.algorithm.needs_critic:
        critic_path = cfg.critic.path or (cfg.reward.model.path if cfg.critic.init == "reward" and cfg.reward.model.path
                                          else policy_path)
        critic = load_scalar_head_model(critic_path, "critic.path", cfg.policy.dtype, dev_critic)
        critic.eval()

    groups = [{"params": list(policy.parameters())}]
    if critic is not None:
        groups.append({"params": list(critic.parameters()), "lr": cfg.critic.lr or cfg.optim.lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    scheduler = training.build_scheduler(optimizer, cfg.optim, cfg.max_steps)
    guard = training.StepGuard(cfg.optim.max_grad_norm)
    kl_ctl = (algo.AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.target
              else algo.FixedKLController(cfg.kl.coef))
    running_mean = algo.RunningMean()
    if rt.world_size > cfg.rollout.prompts_per_step or cfg.rollout.prompts_per_step % rt.world_size:
        raise UserError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple of the "
                        f"world size {rt.world_size} (each rank samples whole groups)")
    prompts_per_rank = cfg.rollout.prompts_per_step // rt.world_size
    K = cfg.rollout.samples_per_prompt
    sampler = data.EpochSampler(len(train_rows), cfg.seed)
    generator = torch.Generator(device=dev_policy).manual_seed(cfg.seed * 1000 + rt.rank)  # each rank samples differently

    step = 0
    ckpt = run_dir.latest(warn=print if rt.is_main else None)
    if ckpt is not None:
        names = ["policy"] + (["critic"] if critic is not None else [])
        tensors, state = RunDir.load(ckpt, names)
        policy.load_state_dict(tensors["policy"])
        if critic is not None:
            critic.load_state_dict(tensors["critic"])
        step = training.restore_trainer_state(state, optimizer, scheduler)
        sampler.load_state_dict(state["sampler"])
        kl_ctl.load_state_dict(state["kl"])
        running_mean.load_state_dict(state["running_mean"])
        generator.set_state(state["generators"][rt.rank])
    ddp_policy = training.wrap_ddp(policy, rt)
    ddp_critic = training.wrap_ddp(critic, rt) if critic is not None else None

    tracker = Tracker(run_dir.root, "rl", cfg.max_steps, step, enabled=rt.is_main,
                      progress_keys=("score", "kl", "response_len", "samples_per_s"))
    tracker.message(f"rl: {cfg.algorithm.name} ({cfg.algorithm.advantage}"
                    f"{', baseline ' + cfg.algorithm.baseline if cfg.algorithm.advantage == 'reinforce' else ''}), "
                    f"{cfg.rollout.prompts_per_step} prompts x {K} samples per step over {rt.world_size} rank(s), "
                    f"rewards: {', '.join([n for n, _ in reward_fns] + (['reward model'] if reward_model else []))}"
                    + (f"; resuming at step {step}" if step else ""))
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
            with torch.no_grad():
                rm = last_token_scores(reward_model, rollout.input_ids.to(dev_reward), rollout.attention_mask.to(dev_reward))
            rm = (rm.float().cpu() - rm_mean) / rm_std
            scores += cfg.reward.model.weight * rm
            stats["rm_score"] = rm.mean()
        scores += cfg.reward.no_stop_penalty * (~rollout.stopped.cpu()).float()
        step_rewards = algo.place_step_rewards(step_values, step_positions, (B, T), dtype=torch.float32)
        return scores.to(dev_policy), step_rewards.to(dev_policy), stats

    def evaluate() -> dict:
        if not rt.is_main:
            return {}
        accuracy, samples, mean_len, responses = training.held_out_accuracy(
            policy, tokenizer, eval_rows, eval_prompts, cfg.eval, dev_policy)
        metrics = {"eval_response_chars": mean_len, "_samples": samples}
        if accuracy is not None:
            metrics["eval_accuracy"] = accuracy
        if reward_model is not None:  # the RM's (normalised) score of the greedy held-out responses
            rm_scores = score_texts(reward_model, tokenizer, eval_prompts, responses, dev_reward)
            metrics["eval_rm_score"] = float(((rm_scores - rm_mean) / rm_std).mean())
        return metrics

    before = evaluate() if step == 0 else {}
    if before:
        tracker.log(0, {k: v for k, v in before.items() if not k.startswith("_")}, kind="eval")

    last_eval = {}
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        # ------------------------------------------------------------ 1. rollout
        chosen = sampler.take(cfg.rollout.prompts_per_step)[rt.rank * prompts_per_rank:(rt.rank + 1) * prompts_per_rank]
        rows = [train_rows[i] for i in chosen for _ in range(K)]  # K contiguous samples per prompt
        prompts = [train_prompts[i] for i in chosen for _ in range(K)]
        prompt_ids, prompt_mask = data.left_pad([train_prompt_ids[i] for i in chosen for _ in range(K)],
                                                tokenizer.pad_token_id)
        rollout = sample(policy, prompt_ids.to(dev_policy), prompt_mask.to(dev_policy), cfg.rollout.max_new_tokens,
                         tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.rollout.temperature,
                         generator=generator, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p)
        input_ids, attention_mask, mask = rollout.input_ids, rollout.attention_mask, rollout.response_mask
        P = prompt_ids.shape[1]
        t1 = time.perf_counter()

        # ------------------------------------------------------------ 2. score (+ reference, old log-probs, values)
        scores, step_rewards, score_stats = score_rollout(rollout, prompts, rows)
        with torch.no_grad():
            logprobs_old = response_logprobs(policy, input_ids, attention_mask, P, cfg.rollout.temperature)
            logprobs_ref = response_logprobs(reference, input_ids.to(dev_ref), attention_mask.to(dev_ref), P,
                                             cfg.rollout.temperature).to(dev_policy)
            values_old = (token_values(critic, input_ids.to(dev_critic), attention_mask.to(dev_critic))[:, P - 1:-1]
                          .to(dev_policy) * mask) if critic is not None else None
        kl_per_token = algo.kl_k1(logprobs_old, logprobs_ref) * mask
        t2 = time.perf_counter()

        # ------------------------------------------------------------ 3. advantages
        beta = kl_ctl.value
        kl_in_reward = kl_per_token if cfg.kl.estimator == "k1" else torch.zeros_like(kl_per_token)
        rewards = algo.token_rewards(scores, kl_in_reward, mask, beta, step_rewards)
        a = cfg.algorithm
        if a.advantage == "reinforce":
            advantages, returns = algo.reinforce_advantages(rewards, mask, a.gamma, a.baseline, K, running_mean)
        elif a.advantage == "gae":
            advantages, returns = algo.gae(rewards, values_old, mask, a.gamma, a.lam)
        else:
            advantages, returns = algo.nstep_advantages(rewards, values_old, mask, a.gamma, a.nstep)
        if a.whiten_advantages:
            advantages = algo.masked_whiten(advantages, mask)

        # ------------------------------------------------------------ 4. update
        update_stats: dict[str, list[float]] = {}
        first_mb: dict[str, float] = {}
        n_rows = input_ids.shape[0]
        mb_size = n_rows // a.minibatches
        stop_early = False
        for epoch in range(a.epochs):
            order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed + step * 997 + epoch))
            for m in range(a.minibatches):
                idx = order[m * mb_size:(m + 1) * mb_size].to(dev_policy)
                mb_mask = mask[idx]
                logprobs, entropy = response_logprobs(ddp_policy, input_ids[idx], attention_mask[idx], P,
                                                      cfg.rollout.temperature, with_entropy=True)
                if a.name == "ppo":
                    pg_loss, pg_stats = algo.ppo_policy_loss(logprobs, logprobs_old[idx], advantages[idx], mb_mask,
                                                             a.clip_low, a.clip_high)
                    if epoch == 0 and m == 0:  # checklist 2: ratio 1, clip 0, approx-KL 0 before any update
                        ratio_dev = ((logprobs.detach() - logprobs_old[idx]).exp() - 1).abs() * mb_mask
                        first_mb = {"first_mb_ratio_dev": float(ratio_dev.max()),
                                    "first_mb_clip_frac": float(pg_stats["clip_frac"]),
                                    "first_mb_approx_kl": float(pg_stats["approx_kl"])}
                else:
                    pg_loss = algo.policy_gradient_loss(logprobs, advantages[idx], mb_mask)
                    pg_stats = {}
                entropy_mean = algo.masked_mean(entropy, mb_mask)
                loss = pg_loss - a.entropy_coef * entropy_mean
                if cfg.kl.estimator == "k3":
                    loss = loss + beta * algo.masked_mean(algo.kl_k3(logprobs, logprobs_ref[idx]), mb_mask)
                if ddp_critic is not None:
                    values = token_values(ddp_critic, input_ids[idx].to(dev_critic),
                                          attention_mask[idx].to(dev_critic))[:, P - 1:-1].to(dev_policy)
                    v_loss = algo.value_loss(values, values_old[idx], returns[idx], mb_mask,
                                             a.value_clip if a.name == "ppo" else None)
                    loss = loss + a.value_coef * v_loss
                    update_stats.setdefault("value_loss", []).append(float(v_loss))
                loss.backward()
                params = list(policy.parameters()) + (list(critic.parameters()) if critic is not None else [])
                grad_norm, applied = guard.step(params, optimizer, float(loss.detach()))
                update_stats.setdefault("loss", []).append(float(loss))
                update_stats.setdefault("grad_norm", []).append(grad_norm)
                update_stats.setdefault("entropy", []).append(float(entropy_mean))
                for k, v in pg_stats.items():
                    update_stats.setdefault(k, []).append(float(v))
                if a.name == "ppo" and a.target_kl is not None and float(pg_stats["approx_kl"]) > a.target_kl:
                    stop_early = True
                    break
            if stop_early:
                break
        scheduler.step()
        step += 1
        t3 = time.perf_counter()

        # ------------------------------------------------------------ 5. log and checkpoint
        seq_kl = float(algo.masked_sum(kl_per_token, mask) / n_rows)
        kl_ctl.update(seq_kl, n_rows)
        metrics = {
            "score": float(scores.mean()), **{k: float(v) for k, v in score_stats.items()},
            "reward_with_kl": float(rewards.sum(-1).mean()), "kl": seq_kl, "kl_coef": beta,
            "response_len": float(mask.sum(-1).mean()), "stop_fraction": float(rollout.stopped.float().mean()),
            **{k: sum(v) / len(v) for k, v in update_stats.items()}, **first_mb,
            "samples_per_s": n_rows * rt.world_size / (t3 - t0),
            "tokens_per_s": float(mask.sum()) * rt.world_size / (t3 - t0),
            "time_rollout_frac": (t1 - t0) / (t3 - t0), "time_score_frac": (t2 - t1) / (t3 - t0),
            "time_update_frac": (t3 - t2) / (t3 - t0), "lr": scheduler.get_last_lr()[0], "early_stop": int(stop_early),
        }
        if values_old is not None:
            metrics["explained_variance"] = float(algo.explained_variance(values_old, returns, mask))
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            tracker.log(step, metrics)
        if step % cfg.eval.every == 0 or step == cfg.max_steps:
            last_eval = evaluate()
            tracker.log(step, {k: v for k, v in last_eval.items() if not k.startswith("_")}, kind="eval")
        if step % cfg.checkpoint.every == 0 or step == cfg.max_steps:
            gen_states = [generator.get_state()]
            if rt.distributed:
                gathered = [None] * rt.world_size
                torch.distributed.all_gather_object(gathered, generator.get_state())
                gen_states = gathered
            if rt.is_main:
                tensors = {"policy": policy.state_dict()}
                if critic is not None:
                    tensors["critic"] = critic.state_dict()
                run_dir.save(step, tensors, training.trainer_state(
                    step, optimizer, scheduler, sampler=sampler.state_dict(), kl=kl_ctl.state_dict(),
                    running_mean=running_mean.state_dict(), generators=gen_states), cfg.checkpoint.keep_last)
        rt.barrier()

    # ---------------------------------------------------------------- save
    if not last_eval:
        last_eval = evaluate()
    results = {k: v for k, v in last_eval.items() if not k.startswith("_")}
    if rt.is_main:
        policy_manifest = checkpoint.read_manifest(cfg.policy.path)
        rm_manifest = checkpoint.read_manifest(cfg.reward.model.path)
        run_dir.save_final(policy, tokenizer, {
            "stage": "rl", "run_dir": str(run_dir.root.resolve()), "algorithm": cfg.algorithm.name,
            "parent_model": cfg.policy.path or "embedded tiny model", "sft_run": policy_manifest.get("run_dir"),
            "reward_model": cfg.reward.model.path, "rm_run": rm_manifest.get("run_dir"),
            "reward_functions": list(cfg.reward.functions), "config": dataclasses.asdict(cfg),
            "data_fingerprint": checkpoint.fingerprint(train_rows), "steps": step, "metrics": results,
            "metrics_before": {k: v for k, v in before.items() if not k.startswith("_")}})
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
