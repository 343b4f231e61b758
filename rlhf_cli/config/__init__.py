"""The typed schema of every stage: dataclasses registered in Hydra's ConfigStore.

    fields.py   doc() and the range checks      groups.py   the groups every stage shares
    stages.py   sft / train-rm / dpo / rl         ignored.py  keys a run sets that its options do not read
    tools.py    rlhf eval / generate / label    origin.py   a model built from a config or pretrained, and
                settings and their parser                   the defaults each takes (recorded in `derived`)

Every field carries a one-line doc in ``metadata["help"]`` (shown by
``rlhf <stage> --help``). Range checks live in ``__post_init__`` so they run
when the composed config is turned into these objects, before any model loads;
cross-field checks live in each stage config's ``__post_init__``.

A check raises :class:`rlhf_cli.errors.ConfigError` naming the key and the fix.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from rlhf_cli.config.fields import *  # noqa: F403  (one namespace: `from rlhf_cli.config import X` for every X)
from rlhf_cli.config.groups import *  # noqa: F403
from rlhf_cli.config.ignored import *  # noqa: F403
from rlhf_cli.config.stages import *  # noqa: F403
from rlhf_cli.config.stages import STAGE_SCHEMAS

STAGE_CONFIG_NAMES = {"sft": "sft", "train-rm": "train_rm", "dpo": "dpo", "rl": "rl"}


def register_configs() -> None:
    cs = ConfigStore.instance()
    for stage, schema in STAGE_SCHEMAS.items():
        cs.store(name=f"{STAGE_CONFIG_NAMES[stage]}_schema", node=schema)
