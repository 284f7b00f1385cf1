"""`teacher.source: download`: take TAS's published teacher answers instead of generating them.

What TAS does (its `TeacherFactory.download`): the dataset `bunyaminergen/Stable-Code-Python-SFT` holds
one revision per size and teacher; `size` 16k / 32k / 64k picks `v3` / `v5` / `v7`, and the teacher picks
the docstring style of the answers: `open` (stable-code-instruct-3b) → `-GoogleDocString`,
`closed` (the API model) → `-NumpyDocString`. It loads `split="train"` and stores every record as it is
(`instruction`, `output`): no prompt-length filter, no dedupe, no shuffle, no limit. TAS's `main.py`
downloads the open teacher's answers.

Here:
* which teacher: `teacher.download_from` (`open` | `closed`, default `open` as TAS's main.py); its section's `data.download` is read
  (`teacher.open.data.download` or `teacher.closed.data.download`);
* `repo` defaults to TAS's dataset and can name another hub dataset or a local folder (a dataset saved
  in the hub layout, e.g. by `huggingface-cli download --repo-type dataset … --local-dir DIR`; a folder
  is one revision, loaded as it is);
* `revision`, when set, is used as given instead of the size mapping;
* every record is kept, in the dataset's order, with the id the data stage gives the same text
  (`prompt_id`; the n-th repeat of a text gets `-n`, as the data stage does when it keeps repeats), so
  running again adds nothing. Rows without an instruction or with an empty answer are skipped (an empty
  answer is never stored as an answer) and counted in the log.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.prompts import normalise, prompt_id
from engine.core.secrets import clip
from engine.runner.context import StageContext, StageError
from engine.teacher.output import TeacherOutput

TAS_REPO = "bunyaminergen/Stable-Code-Python-SFT"
SPLIT = "train"
SIZE_VERSIONS = {"16k": "v3", "32k": "v5", "64k": "v7"}  # TAS: size → dataset version
DOCSTRING_STYLES = {"open": "GoogleDocString", "closed": "NumpyDocString"}  # TAS: teacher → answer style

INSTRUCTION_COLUMNS = ("instruction", "prompt", "question")  # TAS's columns first; others for an overridden repo
OUTPUT_COLUMNS = ("output", "response", "answer", "completion")


def tas_revision(size: str, teacher: str) -> str | None:
    """TAS's revision for a size and a teacher (`open` / `closed`), or None for a size TAS does not publish."""
    version = SIZE_VERSIONS.get(size)
    return f"{version}-{DOCSTRING_STYLES[teacher]}" if version else None


@dataclass(frozen=True)
class DownloadPlan:
    teacher: str  # open | closed: whose answers (and docstring style)
    key: str  # the config section read, e.g. teacher.open.data.download
    repo: str  # hub id or local folder
    revision: str | None  # None for a local folder (loaded as it is)
    split: str = SPLIT

    @property
    def local(self) -> bool:
        return self.revision is None

    @property
    def label(self) -> str:
        """What produced the answers; stored in each record's `model`."""
        return self.repo if self.local else f"{self.repo}@{self.revision}"


def download_teacher(config: Any) -> str:
    """Whose answers to download: `teacher.download_from` (TAS's main.py: `open`)."""
    teacher = config.teacher.download_from
    if teacher not in DOCSTRING_STYLES:
        raise StageError(f"teacher.download_from: {teacher!r}; use open or closed")
    return teacher


def plan_download(config: Any, teacher: str | None = None) -> DownloadPlan:
    """Repo, revision and split for `teacher.source: download`, as TAS chooses them."""
    teacher = teacher or download_teacher(config)
    key = f"teacher.{teacher}.data.download"
    download = getattr(config.teacher, teacher).data.download
    repo = (download.repo or "").strip() or TAS_REPO
    if Path(repo).expanduser().is_dir():
        return DownloadPlan(teacher, key, str(Path(repo).expanduser()), None)
    revision = (download.revision or "").strip()
    if not revision:
        revision = tas_revision(download.size, teacher) or ""
        if not revision:
            sizes = ", ".join(f"{size} ({tas_revision(size, teacher)})" for size in SIZE_VERSIONS)
            raise StageError(f"{key}.size: {download.size!r} is not a size TAS publishes; use one of {sizes}")
    return DownloadPlan(teacher, key, repo, revision)


def download_answers(ctx: StageContext, output: TeacherOutput) -> None:
    plan = plan_download(ctx.config)
    dataset = _load(plan)
    columns = list(dataset.column_names)
    instruction = next((c for c in INSTRUCTION_COLUMNS if c in columns), None)
    answer = next((c for c in OUTPUT_COLUMNS if c in columns), None)
    if instruction is None or answer is None:
        raise StageError(
            f"{plan.key}.repo: {plan.label} has columns {columns}; "
            f"need one of {INSTRUCTION_COLUMNS} and one of {OUTPUT_COLUMNS}"
        )

    repaired = output.repair()
    for problem in repaired.corrupt:
        ctx.events.log(f"{problem}: moved to {repaired.quarantine}", level="warning")
    if repaired.stale:
        ctx.events.log(
            f"{repaired.stale} answers made with other teacher settings moved to {repaired.stale_file}", level="warning"
        )
    present = output.records()
    others = sorted({str(r.get("model")) for r in present} - {plan.label})
    if others:
        raise StageError(
            f"teacher.base.output_path: {output.path} already holds answers from {', '.join(others)}, and this run "
            f"downloads {plan.label}; move that file away (or set teacher.base.output_path) so the two never mix"
        )
    done = {r["id"] for r in present}

    records: list[dict[str, Any]] = []
    seen: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for number, row in enumerate(dataset, start=1):
        if number % 2000 == 0:
            ctx.check_cancelled()
        text, reply = row.get(instruction), row.get(answer)
        if not isinstance(text, str) or not text.strip():
            skipped["no instruction"] += 1
            continue
        seen[normalise(text)] += 1
        repeat = seen[normalise(text)]
        pid = prompt_id(text) + (f"-{repeat}" if repeat > 1 else "")
        if not isinstance(reply, str) or not reply.strip():
            skipped["empty answer"] += 1
        elif pid not in done:
            done.add(pid)
            records.append({"id": pid, "instruction": text, "output": reply, "model": plan.label})
    output.append(records)

    total = len(dataset)
    ctx.events.progress(total, total, "records")
    ctx.events.metric("answers", len(done))
    ctx.events.artifact(output.path, "teacher answers")
    repeats = sum(n - 1 for n in seen.values())
    notes = [f"{n} skipped ({why})" for why, n in sorted(skipped.items())]
    notes += [f"{repeats} repeated instructions kept as TAS keeps them (ids -2, -3, …)"] if repeats else []
    ctx.events.log(
        f"{plan.label} ({plan.split}): stored {len(records)} answers, {len(present)} were already there"
        + (f"; {'; '.join(notes)}" if notes else "")
    )


def _load(plan: DownloadPlan):
    try:
        from datasets import load_dataset

        if plan.local:
            return load_dataset(plan.repo, split=plan.split)
        return load_dataset(plan.repo, revision=plan.revision, split=plan.split)
    except Exception as exc:  # offline, unknown repo or revision, no train split
        reason = clip(str(exc).strip().splitlines()[0], 300) if str(exc).strip() else type(exc).__name__
        if plan.local:
            raise StageError(f"{plan.key}.repo: cannot load the folder {plan.repo} ({reason})") from None
        raise StageError(
            f"{plan.key}: cannot load {plan.repo!r} at revision {plan.revision!r}, split {plan.split!r} ({reason}). "
            f"Offline? On a machine with internet run `huggingface-cli download --repo-type dataset {plan.repo} "
            f"--revision {plan.revision} --local-dir DIR`, copy DIR here and set {plan.key}.repo: DIR "
            "(or generate the answers here: teacher.source: open)."
        ) from None
