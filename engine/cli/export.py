"""`tas export RUN [--target kd|ce|assistant] [--out DIR] [--push]`: a run's model as a servable HF folder.

Light: the checks (is there such a model, is the run finished, can it be pushed) happen here, before
anything is loaded; the weights are merged and saved by `python -m engine.export.merge` in a process of
its own (engine.export.plan.run_export), so `tas` never imports torch. The push (huggingface_hub)
runs here. stdout gets the folder (and the repository URL after a push); everything else goes to stderr.
"""

from __future__ import annotations

import argparse

from engine.cli.common import console, errors, fail
from engine.core.secrets import redact
from engine.export.plan import EXPORT_TARGETS, ExportRefused, hub_token, prepare, push_folder, push_repo, run_export
from engine.pipeline.models import STUDENT_KD
from engine.store.runs import RunStore, runs_root


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    export = sub.add_parser(
        "export",
        parents=[common],
        help="a run's model as a servable Hugging Face folder (and --push it)",
        description="Write a run's model as a Hugging Face folder: safetensors weights (a LoRA adapter merged "
        "into a full-precision copy of its base), tokenizer, generation config and a model card with "
        "the run's eval report and config (secrets redacted). Prints the folder.",
    )
    export.add_argument("run", metavar="RUN", help="run id, name, unique part of the id, or 'last'")
    export.add_argument(
        "--target",
        choices=EXPORT_TARGETS,
        default=STUDENT_KD.target,
        help="kd: KD student (default), ce: CE-only control student, "
        "assistant: the fine-tuned assistant with its LoRA adapter merged",
    )
    export.add_argument(
        "--out", metavar="DIR", default=None, help="output folder (default: runs/<run>/export/<target>)"
    )
    export.add_argument(
        "--push",
        action="store_true",
        help="upload to the hub: student.repo (kd), <student.repo>-ce, <student.repo>-assistant; "
        "token from HF_TOKEN (environment or .env)",
    )
    export.add_argument("--repo", metavar="OWNER/NAME", default=None, help="push to this repository instead")
    export.add_argument("--private", action="store_true", help="create the hub repository as private")
    export.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    run = RunStore(runs_root(args.config)).get(args.run)
    try:
        source, out = prepare(run, args.target, args.out or None)  # RunIsLive / ExportRefused before anything is loaded
        repo = token = None
        if args.push:
            repo = push_repo(run.config(), args.target, args.repo)
            token = hub_token(run.workdir)
    except ExportRefused as exc:
        return fail(str(exc))
    errors.print(f"exporting the {source.label} of run {run.label} to {out}", markup=False)
    code, _ = run_export(run, args.target, out, repo or args.repo)
    if code != 0:
        return code if code > 0 else 1  # the export process said why on stderr
    console.print(str(out), markup=False)
    if args.push:
        errors.print(f"pushing {out} to the hub repository {repo}", markup=False)
        try:
            url = push_folder(
                out,
                repo,
                token,
                private=True if args.private else None,
                message=f"tas export --target {args.target} of run {run.id}",
            )
        except Exception as exc:  # the hub's errors (auth, network, permissions): say which, never the token
            return fail(f"push to {repo} failed: {redact(f'{type(exc).__name__}: {exc}')}", code=1)
        console.print(url, markup=False)
    return 0
