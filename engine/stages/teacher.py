"""Stage `teacher`: one answer per prompt, from the open (HF) teacher, the closed (API) teacher, or a
ready dataset downloaded from the hub, or the open teacher served by vLLM (`teacher.source`).

Input: the prompts of the `data` stage (`data.output_path`). Output: `teacher.base.output_path`, an
append-only JSONL keyed by prompt id (see engine/teacher/output.py). Re-running the stage resumes: ids
already answered are skipped, a torn last line is cut and regenerated. `teacher.open.pipeline.resume:
false` starts over, keeping the old file as a timestamped backup.

With the open teacher under torchrun (launch.nproc_per_node > 1) every rank answers a shard into
`<output>.rank<N>`; after a barrier rank 0 appends the shards to the output and removes them. The other
teachers run as one process (engine.pipeline.stages.runs_under_torchrun).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from engine.core.datafiles import DataFileError, read_stage_input
from engine.core.fsio import describe_os_error
from engine.models.loading import resolve_model_path
from engine.runner.context import StageContext, StageError
from engine.store.lineage import fingerprint_id, teacher_fingerprint, write_fingerprint
from engine.teacher.output import TeacherOutput


def shard_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}")


def shard_files(output: Path) -> list[Path]:
    """`<output>.rank<N>` files, and nothing else (not their `.bak` copies)."""
    pattern = re.compile(re.escape(output.name) + r"\.rank\d+")
    return sorted(p for p in output.parent.glob(output.name + ".rank*") if pattern.fullmatch(p.name))


def read_prompts(path: Path) -> list[dict[str, Any]]:
    try:
        prompts = read_stage_input(path, "data.output_path", made_by="data")
    except DataFileError as exc:
        raise StageError(str(exc)) from None
    bad = [i for i, p in enumerate(prompts, 1) if not p.get("id") or not p.get("instruction")]
    if bad:
        raise StageError(f"data.output_path: {path}:{bad[0]}: record without id or instruction; re-run the data stage")
    if not prompts:
        raise StageError(f"data.output_path: {path} has no prompts; re-run the data stage")
    return prompts


def check_teacher(ctx: StageContext) -> None:
    """Fail now if the chosen teacher cannot answer at all (a mistyped or uncached model, no vLLM, no API key):
    checked before the answers file is touched, so a failed start leaves it as it was (`repair` would move
    the answers made with other settings aside, a resume-off run would move them all)."""
    config = ctx.config
    source = config.teacher.source
    if source in ("open", "vllm"):
        resolve_model_path(config.teacher.open.model.name, "teacher.open.model.name", check_hub=True)
    if source == "vllm":
        from engine.teacher.vllm import vllm_python
        from engine.teacher.vllm_server import VllmError, check_python

        try:
            check_python(vllm_python(config, ctx.run.workdir))
        except VllmError as exc:
            raise StageError(f"teacher.vllm: {exc}") from None
    elif source == "closed":
        from engine.teacher.closed import closed_endpoint

        closed_endpoint(config.teacher.closed)


def answered_ids(output: TeacherOutput) -> set[str]:
    """Ids answered in the output and in any shard left by an interrupted multi-GPU run."""
    ids = output.done_ids()
    for shard in shard_files(output.path):
        ids |= TeacherOutput(shard, output.fingerprint).done_ids()
    return ids


def merge_shards(output: TeacherOutput) -> int:
    """Append shard records whose id is not in the output yet, then delete the shards."""
    present = output.done_ids()
    merged = 0
    for shard_file in shard_files(output.path):
        shard = TeacherOutput(shard_file, output.fingerprint)
        shard.repair()
        fresh = [r for r in shard.records() if r["id"] not in present]
        merged += output.append(fresh)
        present |= {r["id"] for r in fresh}
        shard_file.unlink()
    return merged


def run(ctx: StageContext) -> None:
    from engine.models.device import barrier, init_distributed

    config = ctx.config
    rank, world = init_distributed()
    ctx.rank, ctx.world_size = rank, world
    output_path = Path(config.teacher.base.output_path)
    parts = teacher_fingerprint(config, ctx.run.workdir)
    fingerprint = fingerprint_id(parts)
    output = TeacherOutput(output_path, fingerprint)
    if config.teacher.source == "download":
        from engine.teacher.download import download_answers

        if ctx.is_main:  # one writer, or every rank would append every answer
            write_fingerprint(ctx.stage_dir, parts)
            download_answers(ctx, output)  # loads the dataset before it touches the answers
        barrier()
        return
    prompts = read_prompts(Path(config.data.output_path))
    if not config.teacher.open.pipeline.resume or {p["id"] for p in prompts} - answered_ids(output):
        check_teacher(ctx)  # there is something to answer: the teacher must be able to

    if ctx.is_main:
        write_fingerprint(ctx.stage_dir, parts)
        if not config.teacher.open.pipeline.resume:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for old in [output_path, *shard_files(output_path)]:
                if old.exists():  # shards of an interrupted multi-GPU run are old answers too
                    backup = old.with_name(f"{old.name}.{stamp}.bak")
                    try:
                        old.rename(backup)
                    except OSError as exc:
                        raise describe_os_error(exc, old, "teacher.base.output_path") from None
                    ctx.events.log(f"resume is off: previous answers moved to {backup}")
        repaired = output.repair()
        if repaired.torn_bytes:
            ctx.events.log(
                f"cut a torn last line ({repaired.torn_bytes} bytes) from {output_path}; it will be regenerated"
            )
        for problem in repaired.corrupt:
            ctx.events.log(
                f"{problem}: moved to {repaired.quarantine}; its prompt will be answered again", level="warning"
            )
        if repaired.stale:
            ctx.events.log(
                f"{repaired.stale} answers made with other teacher settings moved to {repaired.stale_file}; "
                "they will be answered again with this run's settings",
                level="warning",
            )
        merged = merge_shards(output)
        if merged:
            ctx.events.log(f"merged {merged} answers left in shard files by an interrupted run")
    barrier()

    done = output.done_ids()  # shards were merged before the barrier: every rank sees the same set
    todo = [p for p in prompts if p["id"] not in done]
    if ctx.is_main:
        ctx.events.log(f"{len(prompts)} prompts: {len(prompts) - len(todo)} already answered, {len(todo)} to go")
    total, answered = len(prompts), len(prompts) - len(todo)
    prompt_ids = {p["id"] for p in prompts}
    if ctx.is_main:
        ctx.events.progress(answered, total, "prompts")

    mine = todo[rank::world] if world > 1 else todo
    target = TeacherOutput(shard_path(output_path, rank), fingerprint) if world > 1 else output

    def progress(count: int) -> None:
        nonlocal answered
        answered += count
        if ctx.is_main:
            # other ranks' shards grow too: count the files rather than only our own share
            current = len(answered_ids(output) & prompt_ids) if world > 1 else answered
            ctx.events.progress(min(current, total), total, "prompts")

    system_prompt = ctx.system_prompt("Teacher")
    source = config.teacher.source
    if not mine:
        summary: dict[str, Any] = {"answered": 0, "failed": 0}
    elif source == "open":
        from engine.teacher.open import answer_open

        summary = answer_open(ctx, mine, target, system_prompt, progress)
    elif source == "vllm":
        from engine.teacher.vllm import answer_vllm

        if world > 1:  # one server serves every GPU: tensor / data parallel inside vLLM, not torchrun
            raise StageError(
                "teacher.source vllm runs one server from one process, not under torchrun (`tas run` starts it "
                "so); teacher.vllm.tensor_parallel_size / data_parallel_size spread it over more GPUs"
            )
        summary = answer_vllm(ctx, mine, target, system_prompt)
        progress(0)
    else:
        from engine.teacher.closed import answer_closed

        summary = answer_closed(ctx, mine, target, system_prompt)
        progress(0)

    barrier()
    if not ctx.is_main:
        return
    merge_shards(output)
    done = answered_ids(output)
    missing = [p["id"] for p in prompts if p["id"] not in done]
    ctx.events.progress(total - len(missing), total, "prompts")
    ctx.events.artifact(output_path, "teacher answers")
    ctx.events.log(
        f"answered {summary.get('answered', 0)} prompts in this run; {total - len(missing)}/{total} in total"
    )
    if missing:
        raise StageError(
            f"{len(missing)} of {total} prompts have no answer (see failures in the log"
            f"{' and ' + str(ctx.stage_dir / 'failures.jsonl') if (ctx.stage_dir / 'failures.jsonl').exists() else ''}); "
            f"run the stage again to retry only those"
        )
