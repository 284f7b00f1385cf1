"""Errors that say where: the real line of a bad byte in a CSV, and a full disk while a model is saved."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.core.datafiles import DataFileError, iter_records
from engine.core.fsio import FileWriteError
from engine.train.callbacks import saving


def test_csv_decode_error_names_the_real_line(tmp_path: Path):
    path = tmp_path / "prompts.csv"
    lines = ["instruction"] + [f"prompt number {i} with a few words" for i in range(1, 2001)]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"caf\xe9 on line 2002\nfine again\n")
    with pytest.raises(DataFileError, match=r"prompts\.csv:2002: not UTF-8 text \(byte 0xe9\)"):
        list(iter_records(path))


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
