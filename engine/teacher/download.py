"""`teacher.source: download`: take ready teacher answers from a hub dataset instead of generating them.

The TAS project published its teacher outputs in sizes (`64k`, ...), one revision each; the size in
`teacher.open.data.download.size` picks the revision of `teacher.open.data.download.repo`. The answers
replace both the data and the teacher stage: every (instruction, output) pair is stored with the same
prompt ids the data stage would give.
"""

from __future__ import annotations

from engine.core.prompts import prompt_id
from engine.core.secrets import clip
from engine.runner.context import StageContext, StageError
from engine.teacher.output import TeacherOutput

INSTRUCTION_COLUMNS = ("instruction", "prompt", "question")
OUTPUT_COLUMNS = ("output", "response", "answer", "completion")


def download_answers(ctx: StageContext, output: TeacherOutput) -> None:
    download = ctx.config.teacher.open.data.download
    if not download.repo:
        raise StageError(
            "teacher.open.data.download.repo: not set; name the hub dataset with ready teacher answers "
            "(its revision is teacher.open.data.download.size), or use teacher.source: open / closed"
        )
    try:
        from datasets import load_dataset

        dataset = load_dataset(download.repo, revision=download.size, split="train")
    except Exception as exc:  # offline, unknown repo or revision
        reason = clip(str(exc).strip().splitlines()[0], 300) if str(exc).strip() else type(exc).__name__
        raise StageError(
            f"teacher.open.data.download: cannot load {download.repo!r} at revision {download.size!r} ({reason}). "
            "Offline? Generate the answers here instead (teacher.source: open)."
        ) from None
    columns = dataset.column_names
    instruction = next((c for c in INSTRUCTION_COLUMNS if c in columns), None)
    answer = next((c for c in OUTPUT_COLUMNS if c in columns), None)
    if instruction is None or answer is None:
        raise StageError(f"teacher.open.data.download.repo: {download.repo} has columns {columns}; "
                         f"need one of {INSTRUCTION_COLUMNS} and one of {OUTPUT_COLUMNS}")
    output.repair()
    present = output.done_ids()
    records, seen = [], set(present)
    for row in dataset:
        text, reply = row.get(instruction), row.get(answer)
        if not isinstance(text, str) or not isinstance(reply, str) or not reply.strip():
            continue
        pid = prompt_id(text)
        if pid not in seen:
            seen.add(pid)
            records.append({"id": pid, "instruction": text.strip(), "output": reply.strip(),
                            "model": f"{download.repo}@{download.size}"})
    output.append(records)
    ctx.events.progress(len(seen), len(seen), "prompts")
    ctx.events.artifact(output.path, "teacher answers")
    ctx.events.log(f"stored {len(records)} downloaded answers ({len(present)} were already there)")
