"""Errors that say where: the real line of a bad byte in a CSV, and a full disk while a model is saved or
teacher answers are appended."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.core.datafiles import DataFileError, iter_records, read_stage_input
from engine.core.fsio import FileWriteError
from engine.teacher.output import TeacherOutput
from engine.train.callbacks import saving
from engine.train.pairs import ChatDataError, load_pairs


def test_csv_decode_error_names_the_real_line(tmp_path: Path):
    path = tmp_path / "prompts.csv"
    lines = ["instruction"] + [f"prompt number {i} with a few words" for i in range(1, 2001)]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"caf\xe9 on line 2002\nfine again\n")
    with pytest.raises(DataFileError, match=r"prompts\.csv:2002: not UTF-8 text \(byte 0xe9\)"):
        list(iter_records(path))


def test_stage_input_errors_name_the_key_and_what_to_run(tmp_path: Path):
    missing = tmp_path / "teacher.jsonl"
    with pytest.raises(
        ChatDataError,
        match=r"^teacher\.base\.output_path: .*teacher\.jsonl does not exist; run the teacher stage first \(tas run teacher\)$",
    ):
        load_pairs(missing)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "instruction": "q"}\nnot json\n')
    with pytest.raises(DataFileError, match=r"^data\.output_path: .*prompts\.jsonl:2: bad JSON"):
        read_stage_input(prompts, "data.output_path", made_by="data")


def test_full_disk_while_saving_names_path_key_and_what_to_do(tmp_path: Path):
    safetensors_message = (
        "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
        'message: "No space left on device" }) (os error 28)'
    )
    with pytest.raises(FileWriteError) as info, saving(tmp_path / "adapter", "train.sft.save_path"):
        raise RuntimeError(safetensors_message)
    message = str(info.value)
    assert message.startswith("train.sft.save_path: cannot write ")
    assert str(tmp_path / "adapter") in message and "free some disk space" in message


def test_other_errors_while_saving_pass_through(tmp_path: Path):
    with pytest.raises(ValueError, match="not a disk problem"), saving(tmp_path, "train.sft.save_path"):
        raise ValueError("not a disk problem")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_while_appending_answers_names_path_key_and_what_to_do():
    """/dev/full refuses every write as a full disk does (ENOSPC). The line a failed flush leaves in the buffer
    fails again when the file closes: that second error must not replace the first with a nameless one."""
    with pytest.raises(FileWriteError) as info:
        TeacherOutput("/dev/full").append([{"id": "p1", "instruction": "q", "output": "a"}])
    assert str(info.value) == (
        "teacher.base.output_path: cannot write /dev/full: No space left on device; "
        "free some disk space, then run the stage again to resume"
    )
