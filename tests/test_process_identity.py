"""engine.core.process: one rule for "is this pid still the process we started?", and the pid files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from engine.core import process as process_mod
from engine.core.process import ProcessRecord, current, read_pid_file, stat_fields, write_pid_file
from tests.helpers import wait_for


@pytest.fixture
def child():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_live_child_is_the_same_process_until_it_exits_and_is_reaped(child) -> None:
    record = ProcessRecord.of(child.pid)
    assert record.start_ticks is not None and record.create_time is not None
    assert record.is_alive() and not record.is_reused()
    child.kill()
    wait_for(lambda: (stat_fields(child.pid) or [b"Z"])[0] == b"Z", timeout=10, what="the child to be a zombie")
    assert not record.is_alive()  # a zombie has ended, though its pid still names it
    assert not record.is_reused()
    child.wait()
    assert current(child.pid) is None
    assert not record.is_alive() and not record.is_reused()


def test_a_record_with_another_start_is_not_ours(child) -> None:
    record = ProcessRecord.of(child.pid)
    other = replace(record, start_ticks=record.start_ticks + 1)  # same pid and create_time, other ticks
    assert not other.is_alive() and other.is_reused()
    assert not ProcessRecord(child.pid, record.create_time - 100).is_alive()  # no ticks: create_time decides
    assert ProcessRecord(child.pid, record.create_time + 0.01).is_alive()
    assert not ProcessRecord(child.pid, None).is_alive()  # nothing to compare: never taken for ours


def test_without_proc_create_time_decides(child, monkeypatch) -> None:
    record = ProcessRecord.of(child.pid)
    monkeypatch.setattr(process_mod, "start_ticks_of", lambda pid: None)
    assert ProcessRecord.of(child.pid).start_ticks is None
    assert record.is_alive()
    assert not replace(record, create_time=record.create_time - 5).is_alive()
    assert replace(record, create_time=record.create_time - 5).is_reused()


def test_pid_files_round_trip_with_the_writers_keys(tmp_path: Path) -> None:
    path = tmp_path / "run" / "supervisor.json"
    record = ProcessRecord.of(os.getpid())
    write_pid_file(path, record, stages=["data"], started=1.5)
    assert read_pid_file(path) == record
    data = json.loads(path.read_text())
    assert data["stages"] == ["data"] and data["started"] == 1.5
    assert ProcessRecord.from_json(data) == record
    assert [p.name for p in path.parent.iterdir()] == ["supervisor.json"]  # no temp file left behind


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        '{"pid": 12',  # torn
        "not json",
        "[1, 2]",
        "{}",
        '{"pid": "abc"}',
        '{"pid": null}',
        '{"pid": 0}',
        '{"pid": -1}',
        '{"pid": 5, "start_ticks": "x"}',
        '{"pid": 5, "create_time": [1]}',
    ],
)
def test_a_torn_or_corrupt_pid_file_reads_as_none(tmp_path: Path, text: str) -> None:
    path = tmp_path / "pid"
    path.write_text(text)
    assert read_pid_file(path) is None
    assert read_pid_file(tmp_path / "missing") is None


def test_pid_files_written_by_earlier_code_read(tmp_path: Path, child) -> None:
    me = ProcessRecord.of(child.pid)
    old_files = {
        # runs/<run>/supervisor.json and <stage>/pid: json.dumps of the record, plus stages and started
        "supervisor.json": {
            "pid": me.pid,
            "create_time": me.create_time,
            "start_ticks": me.start_ticks,
            "recorded_at": me.recorded_at,
            "stages": ["data"],
            "started": me.recorded_at,
        },
        # a pid file from before start ticks were recorded
        "pid": {"pid": me.pid, "create_time": me.create_time},
        # runs/<run>/teacher/vllm.pid: no create_time
        "vllm.pid": {"pid": me.pid, "start_ticks": me.start_ticks, "recorded_at": 2.0, "port": 8000, "argv": ["x"]},
    }
    for name, data in old_files.items():
        (tmp_path / name).write_text(json.dumps(data))
        record = read_pid_file(tmp_path / name)
        assert record is not None and record.pid == me.pid, name
        assert record.is_alive() and not record.is_reused(), name
    assert read_pid_file(tmp_path / "vllm.pid") == ProcessRecord(me.pid, None, me.start_ticks, 2.0)


def test_a_leftover_server_group_is_ended_and_a_reused_one_left_alone(tmp_path: Path) -> None:
    """engine.teacher.vllm_server finds a server group by its pid file, with the same rule."""
    from engine.teacher.vllm_server import PID_FILE_ENV, group_members, server_processes, stop_leftover

    pid_file = tmp_path / "vllm.pid"
    marked = {**os.environ, PID_FILE_ENV: str(pid_file.resolve())}  # as VllmServer.start marks its server
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], start_new_session=True, env=marked)
    try:
        wait_for(lambda: len(group_members(leader.pid)) == 2, timeout=10, what="the group's two processes")
        record = ProcessRecord.of(leader.pid)
        write_pid_file(pid_file, replace(record, start_ticks=record.start_ticks + 1), port=1)  # a reused pid
        assert server_processes(pid_file) == []
        assert stop_leftover(pid_file, grace_s=5) is False
        assert not pid_file.exists() and len(group_members(leader.pid)) == 2

        write_pid_file(pid_file, record, port=1)
        assert sorted(server_processes(pid_file)) == sorted(group_members(leader.pid))
        assert stop_leftover(pid_file, grace_s=5) is True
        leader.wait(timeout=10)
        assert group_members(leader.pid) == [] and not pid_file.exists()
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait()
