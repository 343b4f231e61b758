"""Peak RSS and parameters held by `rlhf rl` with and without LoRA (policy = a base model dir).

    .venv/bin/python scripts/lora_memory.py /tmp/lora_mem            # tiny (~150k) and a ~34M model

Each run is a fresh subprocess; its peak RSS is read with getrusage(RUSAGE_CHILDREN) in a fresh
wrapper process, so one run's peak never hides another's. Parameters come from the run's
manifest (`parameters_held`: every parameter storage of every model the stage built, once).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path("/tmp/lora_mem")
COMMON = ["max_steps=2", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=16",
          "eval.every=1000", "eval.max_new_tokens=16", "data.num_eval=20", "data.num_train=200", "device=cpu"]
WRAP = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def base(name: str, **overrides) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "main"))
    from rlhf_cli.models.embedded import write_embedded_base

    return write_embedded_base(ROOT / name, 0, **overrides)


def run(policy: Path, tag: str, lora: list[str]) -> dict:
    out = ROOT / f"rl-{tag}"
    cmd = [sys.executable, "-c", WRAP, sys.executable, "-m", "rlhf_cli", "rl", f"policy.path={policy}",
           f"output_dir={out}", *COMMON, *lora]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"RLHF_NO_PROGRESS": "1", **__import__("os").environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    held = json.loads((out / "final" / "manifest.json").read_text())["parameters_held"]
    return {"run": tag, "peak_rss_mib": round(int(proc.stdout.strip().splitlines()[-1]) / 1024), **held}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default=str(ROOT), help="where the models and runs go (default %(default)s)")
    ROOT = Path(parser.parse_args().root)
    ROOT.mkdir(parents=True, exist_ok=True)
    models = {"tiny": base("tiny"),
              "34M": base("m34", hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=8)}
    for name, path in models.items():
        for tag, lora in (("full", []), ("lora", ["lora.r=8"])):
            print(json.dumps(run(path, f"{name}-{tag}", lora)), flush=True)
