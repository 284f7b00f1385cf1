"""Export a run's model as a merged, servable Hugging Face folder: the heavy half.

Heavy module (torch, transformers, peft inside the functions). `export_run(run, target, out_dir)` loads
the KD student, the CE-only control student or the fine-tuned assistant of a run, merges a LoRA adapter
into a full-precision copy of its base (the sft stage trains it on a 4-bit base: QLoRA; users expect the
merged model unquantized), and writes safetensors weights, the tokenizer, a generation config and the model
card (`engine.export.card.model_card`). What is exported, the checks and the push live in the light
`engine.export.plan`; `tas export` runs this module as a process of its own:

    python -m engine.export.merge --run RUN_DIR [--target kd|ce|assistant] [--out DIR] [--repo OWNER/NAME]

The folder is written next to its destination and renamed into place, so a failed export leaves the
previous one (if any) untouched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from engine.core.secrets import redact
from engine.export.card import model_card
from engine.export.plan import EXPORT_TARGETS, ExportRefused, ExportSource, prepare
from engine.models.loading import ModelNotFound, load_causal_lm, load_tokenizer, resolve_model_path
from engine.pipeline.models import STUDENT_KD
from engine.store.runs import Run, RunIsLive


def export_run(
    run: Run,
    target: str = STUDENT_KD.target,
    out_dir: str | os.PathLike[str] | None = None,
    repo: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write the run's `target` model (kd, ce, assistant) as a Hugging Face folder; returns the folder.

    `out_dir` defaults to runs/<run>/export/<target>/. `repo` is only named in the model card's usage
    example. Raises RunIsLive while the run works and ExportRefused when it has no such model.
    """
    say = log or (lambda text: None)
    source, out = prepare(run, target, out_dir)
    config = run.config()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model, tokenizer = load_merged(source, say)
        tokenizer.padding_side = config.assistant.tokenizer.padding_side
        model.generation_config = generation_config(model, tokenizer, config.assistant.inference.max_new_tokens)
        say(f"saving to {out}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not any((tmp / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
            raise RuntimeError(f"transformers wrote no safetensors weights into {tmp}")
        (tmp / "README.md").write_text(model_card(run, source, repo), encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_merged(source: ExportSource, say: Callable[[str], None] = lambda text: None):
    """(model, tokenizer) of an export source: a plain model, or base + LoRA adapter merged in full precision."""
    import torch

    tokenizer = load_tokenizer(source.tokenizer, key=f"export {source.target} tokenizer")
    if source.adapter is None:
        say(f"loading the {source.label} from {source.model}")
        model = load_causal_lm(source.model, key=f"export {source.target}", dtype="auto")
        return model.eval(), tokenizer
    from engine.train.assistant import merge_lora

    saved = _checkpoint_dtype(source.model)
    say(f"loading {source.model} in float32 and merging the LoRA adapter {source.adapter}")
    # in the base checkpoint's precision: the machine that exports need not be the one that trained
    model = merge_lora(source.model, source.adapter, saved if saved in (torch.bfloat16, torch.float16) else None)
    return model.eval(), tokenizer


def _checkpoint_dtype(name: str):
    """The dtype the base model's checkpoint is stored in (None when its config does not say)."""
    import torch
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name, "assistant.model.name"))
    except (OSError, ValueError):
        return None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype


def generation_config(model, tokenizer, max_new_tokens: int):
    """The model's generation config (its own, else one from its config) with the tokenizer's EOS and pad
    ids and the run's reply length (assistant.inference.max_new_tokens)."""
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None)
    gen = (
        GenerationConfig.from_dict(gen.to_dict())
        if gen is not None
        else GenerationConfig.from_model_config(model.config)
    )
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    gen.eos_token_id = ids[0] if len(ids) == 1 else (ids or None)
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.max_new_tokens = max_new_tokens
    gen.validate()
    return gen


def _replace(tmp: Path, out: Path) -> None:
    """Put the new folder at `out`; an earlier export there is removed only once the new one is in place."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.export.merge", description="Export a run's model as a servable Hugging Face folder."
    )
    parser.add_argument("--run", required=True, help="the run directory")
    parser.add_argument("--target", choices=EXPORT_TARGETS, default=STUDENT_KD.target)
    parser.add_argument("--out", default=None, help="output folder (default: <run>/export/<target>)")
    parser.add_argument("--repo", default=None, help="hub repository named in the model card")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the user sees our lines, not loading chatter
    hf_logging.disable_progress_bar()
    say = lambda text: print(redact(text), file=sys.stderr, flush=True)  # noqa: E731
    try:
        out = export_run(Run.open(args.run), args.target, args.out, repo=args.repo, log=say)
    except (ExportRefused, RunIsLive, ModelNotFound, FileNotFoundError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr, flush=True)
        return 2
    print(out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
