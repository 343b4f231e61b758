"""Keys that only some options read: one warning line per key a run set and will not read (`ignored_keys`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from rlhf_cli.config.fields import leaf_keys
from rlhf_cli.config.stages import STAGE_SCHEMAS, AlgorithmConfig, DPOConfig


@dataclass(frozen=True)
class ReadWhen:
    """`keys` (or key prefixes) are read only when `when(cfg)` holds; `needs` says so in words (or returns
    the words, when they come from a registry) and `now(cfg)` names the setting that holds instead."""
    keys: tuple
    when: Callable
    needs: str | Callable[[], str]
    now: Callable


def _critic_estimators() -> str:
    from rlhf_cli.algorithms import ADVANTAGE_ESTIMATORS  # torch: see AlgorithmConfig.__post_init__

    names = [n for n in ADVANTAGE_ESTIMATORS if ADVANTAGE_ESTIMATORS.trait(n, "needs_values")]
    return "a critic (" + " or ".join(f"algorithm.advantage={n}" for n in names) + ")"


def _trust_region_losses() -> str:
    from rlhf_cli.algorithms import POLICY_LOSSES

    return " or ".join(f"algorithm.name={n}" for n in POLICY_LOSSES if POLICY_LOSSES.trait(n, "trust_region"))


def _trust_region(cfg) -> bool:
    from rlhf_cli.algorithms import POLICY_LOSSES

    return POLICY_LOSSES.trait(cfg.algorithm.name, "trust_region")


# The one table of what the recipes read only under some options (rl.py, sft.py, train_rm.py, dpo.py, loop.py,
# data.py); the algorithm keys that only some registered estimators and losses read are added from
# their signatures (_registry_rules). A key the user sets while its rule does not hold is ignored.
READ_WHEN = [
    ReadWhen(("epochs",), lambda c: c.max_steps is None, "max_steps=null (a run counted in epochs)",
             lambda c: f"max_steps={c.max_steps}"),
    ReadWhen(("lora.alpha", "lora.dropout", "lora.target_modules", "lora.save"), lambda c: c.lora.r > 0,
             "lora.r > 0", lambda c: "lora.r=0"),
    ReadWhen(("logging.wandb_project",), lambda c: c.logging.wandb, "logging.wandb=true", lambda c: "logging.wandb=false"),
    ReadWhen(("data.num_train", "data.num_eval"), lambda c: c.data.train is None, "data.train=null (the embedded task)",
             lambda c: f"data.train={c.data.train}"),
    ReadWhen(("critic", "placement.critic", "algorithm.value_coef"), lambda c: c.algorithm.needs_critic,
             _critic_estimators, lambda c: f"algorithm.advantage={c.algorithm.advantage}"),
    ReadWhen(("algorithm.value_clip", "algorithm.target_kl"), _trust_region, _trust_region_losses,
             lambda c: f"algorithm.name={c.algorithm.name}"),
    ReadWhen(("kl.horizon",), lambda c: c.kl.target is not None, "kl.target set (an adaptive KL coefficient)",
             lambda c: "kl.target=null"),
    ReadWhen(("reward.model.weight", "reward.model.normalize", "reward.model.dtype", "placement.reward"),
             lambda c: bool(c.reward.model.path), "reward.model.path set", lambda c: "reward.model.path=null"),
    ReadWhen(("rollout.vllm", "rollout.is_cap"), lambda c: c.rollout.engine == "vllm", "rollout.engine=vllm",
             lambda c: f"rollout.engine={c.rollout.engine}"),
    ReadWhen(("reward.function_weight",), lambda c: bool(c.reward.functions), "reward.functions set",
             lambda c: "reward.functions=[]"),
    ReadWhen(("rollout.actors", "rollout.sync_every", "rollout.max_lag", "rollout.rho_max"),
             lambda c: c.rollout.mode == "async", "rollout.mode=async", lambda c: f"rollout.mode={c.rollout.mode}"),
]


def _registry_rules() -> list[ReadWhen]:
    """algorithm.K is read only by the registered advantage estimators and policy losses whose signature
    names K (rl.py passes every algorithm key to both): one rule per such key."""
    import inspect

    from rlhf_cli.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES

    fields = {f.name for f in dataclasses.fields(AlgorithmConfig)}
    readers: dict[str, list[tuple[str, str]]] = {}  # key -> [(config key of the choice, option)]
    for choice, registry in (("advantage", ADVANTAGE_ESTIMATORS), ("name", POLICY_LOSSES)):
        for option, fn in registry.items():
            for param in set(inspect.signature(fn).parameters) & fields:
                readers.setdefault(param, []).append((choice, option))
    rules = []
    for key, who in sorted(readers.items()):
        rules.append(ReadWhen(
            (f"algorithm.{key}",),
            lambda c, who=who: any(getattr(c.algorithm, choice) == option for choice, option in who),
            " or ".join(f"algorithm.{choice}={option}" for choice, option in who),
            lambda c, who=who: ", ".join(sorted({f"algorithm.{ch}={getattr(c.algorithm, ch)}" for ch, _ in who}))))
    return rules


def _preference_rules() -> list[ReadWhen]:
    """dpo: a loss key (label_smoothing, gamma) is read only by the registered losses whose signature names it."""
    import inspect

    from rlhf_cli.algorithms import PREFERENCE_LOSSES

    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    readers: dict[str, list[str]] = {}
    for option, fn in PREFERENCE_LOSSES.items():
        for param in set(inspect.signature(fn).parameters) & fields:
            readers.setdefault(param, []).append(option)
    return [ReadWhen((key,), lambda c, who=who: c.loss in who, " or ".join(f"loss={o}" for o in sorted(who)),
                     lambda c: f"loss={c.loss}")
            for key, who in sorted(readers.items()) if len(who) < len(PREFERENCE_LOSSES)]


def ignored_keys(stage: str, cfg, overrides: list[str]) -> list[str]:
    """One warning line per key=value the user set (command line or config file) that this config's
    options do not read, naming the key, the option that would read it and the one in force."""
    keys = set(leaf_keys(STAGE_SCHEMAS[stage]))
    rules = READ_WHEN + (_registry_rules() if stage == "rl" else _preference_rules() if stage == "dpo" else [])
    lines = []
    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        if override.startswith("~") or key.startswith("hydra.") or value in ("null", "None", ""):
            continue
        for rule in rules:
            prefix = next((r for r in rule.keys if key == r or key.startswith(r + ".")), None)
            if prefix is None or not any(k == prefix or k.startswith(prefix + ".") for k in keys):
                continue
            if not rule.when(cfg):
                needs = rule.needs() if callable(rule.needs) else rule.needs
                lines.append(f"{key}={value} is ignored: it is read only with {needs}, and this run has "
                             f"{rule.now(cfg)}; drop the key or change that setting")
    return lines
