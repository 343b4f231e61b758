"""Tab completion for bash: `rlhf <TAB>`, `rlhf rl algo<TAB>`, `rlhf rl algorithm=<TAB>`, `rlhf rl optim.<TAB>`.

    eval "$(rlhf completion bash)"                    # this shell
    rlhf completion bash >> ~/.bashrc                 # every new shell

Hydra's own `--shell-completion` cannot serve `rlhf`: its query parses the whole
command line as overrides, stage word included, so it answers nothing. The
script below asks `rlhf __complete` instead, with the line up to the cursor;
the answers are the stages and tools, then the stage's config groups
(`algorithm=`, with their options after the `=`), its keys (`optim.lr=`) and
flags. Bash splits words at `=` and `:`, so each answer is cut to the part
after the last of those in the word being completed. No answer falls back to
file names (a CONFIG.yaml, a run dir).
"""

from __future__ import annotations

import sys

from rlhf_cli.commands.compose import CONF_DIR, config_name
from rlhf_cli.errors import UserError

BASH_SCRIPT = r"""# rlhf tab completion (bash): eval "$(rlhf completion bash)"
_rlhf_complete() {
    local IFS=$'\n'
    COMPREPLY=( $("$1" __complete "${COMP_LINE:0:$COMP_POINT}" 2>/dev/null) )
    if [[ ${#COMPREPLY[@]} -eq 1 && "${COMPREPLY[0]}" == *[=.] ]]; then
        compopt -o nospace 2>/dev/null
    fi
}
complete -o default -F _rlhf_complete rlhf
"""

STAGE_FLAGS = ["--help", "--cfg", "-m", "--multirun"]
WORD_BREAKS = "=:"


def stage_groups(stage: str) -> dict[str, list[str]]:
    """The config groups the stage's primary YAML picks from -> their options (conf/<group>/*.yaml)."""
    import yaml

    primary = yaml.safe_load((CONF_DIR / f"{config_name(stage)}.yaml").read_text()) or {}
    groups = {}
    for entry in primary.get("defaults", []):
        if isinstance(entry, dict):
            for group in entry:
                if (CONF_DIR / group).is_dir():
                    groups[group] = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    return groups


def candidates(words: list[str], current: str, commands: list[str]) -> list[str]:
    """Full-word answers for `current`, given the words before it (words[0] is the program) and the
    dispatcher's commands (stages and tools)."""
    from rlhf_cli.config import STAGE_SCHEMAS, leaf_keys

    stages = list(STAGE_SCHEMAS)
    before = words[1:]
    if not before:
        return [w for w in [*commands, "completion", "--help", "--version"] if w.startswith(current)]
    command = before[0]
    if command == "validate":
        if len(before) == 1:
            return [s for s in stages if s.startswith(current)]
        command = before[1]
    if command == "completion":
        return ["bash"] if len(before) == 1 and "bash".startswith(current) else []
    if command == "eval":
        from rlhf_cli.commands.evaluate import EvalToolConfig

        return [k + "=" for k in leaf_keys(EvalToolConfig) if (k + "=").startswith(current)] if current else []
    if command not in stages:
        return []  # plot and unknown words: file names

    groups = stage_groups(command)
    if "=" in current:
        group, _, prefix = current.partition("=")
        return [f"{group}={o}" for o in groups.get(group, []) if o.startswith(prefix)]
    if current.startswith("-"):
        return [f for f in STAGE_FLAGS if f.startswith(current)]
    keys = leaf_keys(STAGE_SCHEMAS[command])
    found = [g + "=" for g in groups if g.startswith(current)]
    # one level at a time: `opt` -> `optim.`, then `optim.` -> `optim.lr=` ...
    depth = current.count(".")
    for key in keys:
        if key.startswith(current):
            parts = key.split(".")
            word = ".".join(parts[:depth + 1]) + ("." if len(parts) > depth + 1 else "=")
            if word not in found:
                found.append(word)
    return found + (STAGE_FLAGS[:2] if not current else [])


def complete(line: str, commands: list[str]) -> list[str]:
    """What bash should offer for the line up to the cursor (cut after the word's last `=` or `:`)."""
    words = line.split()
    current = "" if not words or line[-1:].isspace() else words.pop()
    cut = max(current.rfind(c) for c in WORD_BREAKS) + 1
    return [c[cut:] for c in candidates(words, current, commands)]


def main(args: list[str], commands: list[str]) -> None:
    """`rlhf completion bash` prints the script; `rlhf __complete LINE` answers one query."""
    if args[:1] == ["__complete"]:
        print("\n".join(complete(args[1] if len(args) > 1 else "", commands)))
        return
    if args != ["bash"]:
        raise UserError("usage: rlhf completion bash (only bash is supported); e.g. eval \"$(rlhf completion bash)\"")
    sys.stdout.write(BASH_SCRIPT)
