"""GPU monitoring: fake and NVML backends, labelling our stage workers, `tas gpu`, and the GPU tab."""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from engine.cli.gpu import add_parser as add_gpu_command
from engine.cli.gpu import cmd_gpu
from engine.core.process import ProcessRecord, write_pid_file
from engine.gpu import fake as fake_mod
from engine.gpu.fake import FAKE_ENV, FakeBackend
from engine.gpu.format import render_snapshot
from engine.gpu.labels import label_processes
from engine.gpu.model import GIB, GpuProcess, GpuSnapshot, GpuUnavailable
from engine.gpu.nvml import NO_DRIVER, NvmlBackend
from engine.gpu.sampler import Sampler, open_backend
from engine.store.runs import RunStore
from tests.helpers import TINY_CONFIG, wait_until
from tests.helpers import wait_for as wait_until_true

ROOT = Path(__file__).resolve().parent.parent


def _real_nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:  # any failure: no usable driver here
        return False


needs_no_driver = pytest.mark.skipif(_real_nvml_works(), reason="this machine has a working NVIDIA driver")


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def no_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAKE_ENV, raising=False)


@pytest.fixture
def worker(tmp_path: Path):
    """A live 'stage worker' (a shell) with a child (a torchrun rank, say), recorded as run · teacher."""
    from engine.config.load import load_config

    runs = tmp_path / "runs"
    run = RunStore(runs).create(load_config(TINY_CONFIG), "configs/tiny.yaml")
    # its command line names the run as a worker's does ($0.. of the script): only such a process is ours
    proc = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 30 & echo $!; wait", "engine.runner.worker", "teacher", "--run", str(run.path)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child_pid = int(proc.stdout.readline())
    run.stage_dir("teacher").mkdir(parents=True, exist_ok=True)
    write_pid_file(run.stage_dir("teacher") / "pid", ProcessRecord.of(proc.pid))
    write_pid_file(run.path / "supervisor.json", ProcessRecord.of(os.getpid()), stages=["teacher"])
    try:
        yield types.SimpleNamespace(pid=proc.pid, child=child_pid, run=run, runs=runs)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdout.close()


def fake_file(path: Path, processes: list[dict] | None = None, **extra) -> Path:
    spec = {"driver_version": "550.54.15", "gpus": 2, "frozen": True, "processes": processes or [], **extra}
    path.write_text(json.dumps(spec))
    return path


# ------------------------------------------------------------------------------------- fake backend


def test_fake_backend_values_are_plausible_and_vary_slowly(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = FakeBackend(2)
    gpus, processes, driver = backend.sample()
    assert [g.index for g in gpus] == [0, 1] and processes == [] and driver
    for g in gpus:
        assert "H100" in g.name and g.uuid
        assert 0 < g.memory_used < g.memory_total == 81559 * 1024**2
        assert 0 <= g.utilization_gpu <= 100 and 20 < g.temperature_c < 90
        assert 0 < g.power_w <= g.power_limit_w == 700
    later = backend.started + 1
    monkeypatch.setattr(fake_mod.time, "monotonic", lambda: later)
    moved, _, _ = backend.sample()
    assert moved != gpus  # values drift...
    assert all(abs(a.utilization_gpu - b.utilization_gpu) <= 20 for a, b in zip(gpus, moved))  # ...slowly


def test_frozen_fake_and_json_description(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAKE_ENV, "3:frozen")
    backend = open_backend()
    first = backend.sample()
    time.sleep(0.01)
    assert backend.sample() == first and len(first[0]) == 3

    spec = tmp_path / "fake.json"
    spec.write_text(
        json.dumps(
            {
                "driver_version": "535.1",
                "gpus": [{"name": "Tiny GPU", "memory_total_gib": 8, "memory_used_gib": 2, "utilization_gpu": 40}],
                "processes": [{"gpu": 0, "pid": 4242, "used_memory_gib": 1.5, "name": "python train.py"}],
            }
        )
    )
    monkeypatch.setenv(FAKE_ENV, str(spec))
    gpus, processes, driver = open_backend().sample()
    assert driver == "535.1" and gpus[0].name == "Tiny GPU" and gpus[0].memory_fraction == 0.25
    assert gpus[0].temperature_c is None and gpus[0].power_w is None  # not described: not supported
    assert processes == [GpuProcess(0, 4242, int(1.5 * GIB), "python train.py")]

    monkeypatch.setenv(FAKE_ENV, "two")
    with pytest.raises(GpuUnavailable, match="cannot read"):
        open_backend()


def test_sampler_keeps_bounded_history_and_reports_errors(tmp_path: Path) -> None:
    sampler = Sampler(tmp_path / "runs", backend=FakeBackend(2, frozen=True), history=5)
    for _ in range(8):
        snapshot = sampler.sample()
    assert snapshot.error is None and len(snapshot.gpus) == 2 and snapshot.source == "fake: 2 GPUs"
    history = sampler.history()
    assert set(history) == {0, 1}
    memory, utilization = history[0]
    assert len(memory) == len(utilization) == 5 and memory[-1] == snapshot.gpus[0].memory_used

    spec = fake_file(tmp_path / "fake.json", error="GPU is lost")
    broken = Sampler(backend=FakeBackend(spec_path=spec), retry_s=60)
    snapshot = broken.sample()
    assert snapshot.error == "GPU is lost" and snapshot.gpus == []
    assert broken.sample().error == "GPU is lost"  # not retried before retry_s: still the clear message


# ------------------------------------------------------------------------------------ NVML backend


class _Error(Exception):
    """Stands in for pynvml.NVMLError (value = the NVML return code)."""

    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return f"NVML error {self.value}"


class _NotSupported(_Error):
    def __init__(self, value: int = 3):
        super().__init__(3)


class _Mismatch(Exception):
    """Stands in for pynvml.NVMLLibraryMismatchError (not an NVMLError): nvidia-ml-py newer than the driver."""


def stub_nvml(init_error: int | None = None, count: int = 1, **overrides) -> types.SimpleNamespace:
    """A stand-in for the pynvml module: GPUs without UUID, temperature or power readings.

    Every NVML function counts its calls in `calls` (by name); `overrides` replaces functions by name.
    """

    def not_supported(*args):
        raise _NotSupported()

    def init():
        if init_error is not None:
            raise _Error(init_error)

    functions = {
        "nvmlInit": init,
        "nvmlShutdown": lambda: None,
        "nvmlSystemGetDriverVersion": lambda: b"550.54.15",
        "nvmlDeviceGetCount": lambda: count,
        "nvmlDeviceGetHandleByIndex": lambda i: f"handle{i}",
        "nvmlDeviceGetName": lambda h: b"NVIDIA A10",
        "nvmlDeviceGetUUID": not_supported,
        "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(used=3 * GIB, total=24 * GIB, free=21 * GIB),
        "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(gpu=37, memory=12),
        "nvmlDeviceGetTemperature": not_supported,
        "nvmlDeviceGetPowerUsage": not_supported,
        "nvmlDeviceGetEnforcedPowerManagementLimit": not_supported,
        "nvmlDeviceGetComputeRunningProcesses": lambda h: [
            types.SimpleNamespace(pid=111, usedGpuMemory=2 * GIB),
            types.SimpleNamespace(pid=222, usedGpuMemory=None),
        ],
        "nvmlDeviceGetGraphicsRunningProcesses": not_supported,
        **overrides,
    }
    calls: collections.Counter[str] = collections.Counter()

    def counted(name, function):
        def call(*args):
            calls[name] += 1
            return function(*args)

        return call

    return types.SimpleNamespace(
        NVMLError=_Error,
        NVMLError_NotSupported=_NotSupported,
        NVMLLibraryMismatchError=_Mismatch,
        NVML_ERROR_LIBRARY_NOT_FOUND=12,
        NVML_ERROR_LIB_RM_VERSION_MISMATCH=18,
        NVML_ERROR_NO_PERMISSION=4,
        NVML_ERROR_DRIVER_NOT_LOADED=9,
        NVML_ERROR_NOT_SUPPORTED=3,
        NVML_ERROR_FUNCTION_NOT_FOUND=13,
        NVML_ERROR_UNKNOWN=999,
        NVML_TEMPERATURE_GPU=0,
        calls=calls,
        **{name: counted(name, function) for name, function in functions.items()},
    )


def test_nvml_fields_not_supported_become_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", stub_nvml())
    backend = NvmlBackend()
    gpus, processes, driver = backend.sample()
    (g,) = gpus
    assert driver == "550.54.15" and g.name == "NVIDIA A10" and g.uuid is None
    assert (g.memory_used, g.memory_total, g.utilization_gpu) == (3 * GIB, 24 * GIB, 37)
    assert g.temperature_c is None and g.power_w is None and g.power_limit_w is None
    assert [(p.pid, p.used_memory) for p in processes] == [(111, 2 * GIB), (222, None)]
    text = render_snapshot(GpuSnapshot(ts=0, gpus=gpus, processes=processes, driver_version=driver))
    assert "n/a" in text and max(map(len, text.splitlines())) <= 80
    backend.close()


def test_nvml_unsupported_fields_are_asked_once_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown(h):
        raise _Error(999)  # NVML_ERROR_UNKNOWN: remembered like NotSupported

    def function_not_found(h):
        raise _Error(13)

    nvml = stub_nvml(
        count=2, nvmlDeviceGetPowerUsage=unknown, nvmlDeviceGetEnforcedPowerManagementLimit=function_not_found
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    backend = NvmlBackend()
    for _ in range(4):
        gpus, processes, _ = backend.sample()
        assert [(g.temperature_c, g.power_w, g.power_limit_w, g.uuid) for g in gpus] == [(None,) * 4] * 2
        assert [g.memory_used for g in gpus] == [3 * GIB] * 2 and len(processes) == 4
    for name in (
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerManagementLimit",
        "nvmlDeviceGetUUID",
        "nvmlDeviceGetGraphicsRunningProcesses",
    ):
        assert nvml.calls[name] == 2, name  # once per device, not once per sample
    assert nvml.calls["nvmlDeviceGetMemoryInfo"] == nvml.calls["nvmlDeviceGetComputeRunningProcesses"] == 8
    backend.close()


def test_nvml_transient_errors_are_retried_and_bugs_are_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([_Error(10), types.SimpleNamespace(gpu=55, memory=1)])  # NVML_ERROR_TIMEOUT, then a value

    def flaky(h):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    nvml = stub_nvml(nvmlDeviceGetUtilizationRates=flaky)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    backend = NvmlBackend()
    assert backend.sample()[0][0].utilization_gpu is None  # a timeout: n/a this time...
    assert backend.sample()[0][0].utilization_gpu == 55  # ...and asked again next time

    def bug(*args):
        raise TypeError("a bug, not the driver")

    nvml = stub_nvml(nvmlDeviceGetTemperature=bug)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with pytest.raises(TypeError, match="a bug"):
        NvmlBackend().sample()
    # the sampler still never raises into a UI, but says what happened instead of showing n/a
    snapshot = Sampler(backend=NvmlBackend(nvml)).sample()
    assert snapshot.gpus == [] and "TypeError" in snapshot.error and "a bug" in snapshot.error


def test_nvml_library_newer_than_driver_falls_back_to_v2(monkeypatch: pytest.MonkeyPatch) -> None:
    def mismatch(h):
        raise _Mismatch("Unversioned function called and the pyNVML version does not match the NVML lib version")

    nvml = stub_nvml(
        nvmlDeviceGetComputeRunningProcesses=mismatch,
        nvmlDeviceGetComputeRunningProcesses_v2=lambda h: [types.SimpleNamespace(pid=333, usedGpuMemory=GIB)],
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    backend = NvmlBackend()
    for _ in range(3):
        assert [(p.pid, p.used_memory) for p in backend.sample()[1]] == [(333, GIB)]
    assert nvml.calls["nvmlDeviceGetComputeRunningProcesses"] == 1
    assert nvml.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 3


@pytest.mark.parametrize(
    ("code", "count", "expected"),
    [
        (12, 1, NO_DRIVER),
        (18, 1, "version mismatch"),
        (4, 1, "No permission"),
        (9, 1, "driver is not loaded"),
        (None, 0, "reports no GPU"),
    ],
)
def test_nvml_start_problems_give_clear_messages(monkeypatch, code, count, expected) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", stub_nvml(init_error=code, count=count))
    monkeypatch.delenv(FAKE_ENV, raising=False)
    with pytest.raises(GpuUnavailable) as info:
        open_backend()
    assert expected in info.value.message
    assert Sampler().sample().error == info.value.message


@needs_no_driver
def test_no_driver_on_this_machine_is_a_clear_message(no_fake) -> None:
    with pytest.raises(GpuUnavailable) as info:
        open_backend()
    assert info.value.message == NO_DRIVER
    snapshot = Sampler().sample()
    assert snapshot.error == NO_DRIVER and snapshot.gpus == []


# ------------------------------------------------------------------------------------- our workers


def test_label_processes_finds_our_workers_and_their_children(worker, tmp_path: Path) -> None:
    ours = f"run {worker.run.id} · teacher"
    processes = [
        GpuProcess(0, worker.pid, 10 * GIB),
        GpuProcess(0, worker.child, 5 * GIB),
        GpuProcess(1, os.getpid(), GIB),  # pytest itself: not ours
        GpuProcess(1, 2**22 + 12345, None, "gone"),  # no such process
    ]
    labelled = label_processes(processes, worker.runs)
    assert labelled[0].label == ours and "sh" in labelled[0].name
    assert labelled[1].label.startswith(ours) and "sleep" in labelled[1].name
    assert labelled[2].label is None and "py" in labelled[2].name
    assert (labelled[3].label, labelled[3].name) == (None, "gone")

    # a pid file whose start time does not match (the pid was reused by another program) is not ours
    write_pid_file(worker.run.stage_dir("teacher") / "pid", ProcessRecord(worker.pid, 1.0))
    assert [p.label for p in label_processes(processes, worker.runs)] == [None] * 4
    assert label_processes(processes, tmp_path / "no-runs")[0].label is None


# ------------------------------------------------------------------------------------------ tas gpu


def gpu_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tas")
    parser.add_argument("--config", default="config.yaml")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS)
    add_gpu_command(parser.add_subparsers(dest="command"), common)
    return parser


def test_tas_gpu_prints_an_80_column_table_with_our_label(worker, tmp_path, monkeypatch, capsys) -> None:
    spec = fake_file(
        tmp_path / "fake.json",
        [
            {"gpu": 0, "pid": worker.pid, "used_memory_gib": 30.5},
            {"gpu": 1, "pid": 2**22 + 12345, "used_memory": 512 * 1024**2, "name": "python other.py"},
        ],
    )
    monkeypatch.setenv(FAKE_ENV, str(spec))
    monkeypatch.setenv("TAS_RUNS_DIR", str(worker.runs))
    args = gpu_parser().parse_args(["gpu"])
    assert cmd_gpu(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(map(len, lines)) <= 80
    assert "NVIDIA H100 80GB HBM3" in out and "driver 550.54.15" in out
    assert f"run {worker.run.id} · teacher" in out and "30.5 GiB" in out
    assert "python other.py" in out and "512 MiB" in out
    assert lines[1].startswith("host CPU ") and " · RAM " in lines[1] and " · load " in lines[1]
    assert "CPU" in out and "RSS" in out
    ours = next(line for line in lines if f"run {worker.run.id} · teacher" in line)
    assert "MiB" in ours.split("30.5 GiB", 1)[1]  # its RSS beside it

    args = gpu_parser().parse_args(["gpu", "--count", "2", "--interval", "0.25"])
    assert args.watch is False and args.interval == 0.25
    assert cmd_gpu(args) == 0
    assert capsys.readouterr().out.count("NVIDIA H100 80GB HBM3") == 4  # two samples of two GPUs

    with pytest.raises(SystemExit):
        gpu_parser().parse_args(["gpu", "-w", "--interval", "0.1"])


@needs_no_driver
def test_tas_gpu_without_a_gpu_exits_1_with_the_message(no_fake, capsys) -> None:
    assert cmd_gpu(gpu_parser().parse_args(["gpu"])) == 1
    assert NO_DRIVER in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- GPU tab


def row_keys(table) -> list[str]:
    return [row.key.value for row in table.ordered_rows]


def panel(runs: Path, interval: float):
    from tui.app import TASPanel

    return TASPanel(config_path="configs/tiny.yaml", runs_dir=runs, gpu_interval=interval)


async def test_gpu_tab_shows_fake_gpus_and_labels_our_worker(worker, tmp_path, monkeypatch) -> None:
    from textual.widgets import DataTable, Static

    from tui.tabs.gpu import NO_PROCESS, GpuTab
    from tui.widgets.gpu_card import GpuCard

    monkeypatch.chdir(ROOT)
    spec = fake_file(tmp_path / "fake.json", [{"gpu": 0, "pid": worker.pid, "used_memory_gib": 30.5}])
    monkeypatch.setenv(FAKE_ENV, str(spec))
    app = panel(worker.runs, 0.25)
    async with app.run_test(size=(80, 24)) as pilot:
        tab = app.query_one(GpuTab)
        await wait_until(pilot, lambda: tab.snapshot is not None)
        await pilot.press("f3")
        table = tab.query_one(DataTable)
        await wait_until(pilot, lambda: len(tab.query(GpuCard)) == 2 and row_keys(table) == [f"0:{worker.pid}"])
        assert app.focused is table
        row = [str(cell) for cell in table.get_row_at(0)]
        assert row[:3] == ["0", str(worker.pid), "30.5 GiB"] and row[5] == f"run {worker.run.id} · teacher"
        assert row[4].endswith("MiB")  # the worker's RSS, read with psutil
        assert not tab.has_class("-unavailable")

        await pilot.press("plus")
        assert tab.interval == 0.5
        await pilot.press("plus", "plus")
        assert tab.interval == 2.0
        assert "every 2 s" in str(tab.query_one("#gpu-status", Static).render())
        await pilot.press("minus", "minus", "minus", "minus")
        assert tab.interval == 0.25  # never below the minimum

        # the worker leaves the GPU in the fake: still running, it stays listed as ours, on no GPU
        fake_file(spec, [])
        await wait_until(pilot, lambda: row_keys(table) == [f"-:{worker.pid}"])
        assert [str(cell) for cell in table.get_row_at(0)][:3] == ["-", str(worker.pid), "-"]
        # no longer a worker of ours (its pid file gone) and on no GPU: the table follows
        (worker.run.stage_dir("teacher") / "pid").unlink()
        await wait_until(pilot, lambda: row_keys(table) == [NO_PROCESS])
        assert "no process" in str(table.get_row_at(0)[5])

        # GPUs come and go (a GPU falls off the bus, MIG reconfigured): the list follows
        fake_file(spec, [], gpus=3)
        await wait_until(pilot, lambda: [c.index for c in tab.query(GpuCard)] == [0, 1, 2])
        fake_file(spec, [], gpus=1)
        await wait_until(pilot, lambda: [c.index for c in tab.query(GpuCard)] == [0])


async def test_gpu_tab_with_many_gpus_fits_80x24_and_scrolls(tmp_path, monkeypatch) -> None:
    from textual.widgets import DataTable

    from tui.tabs.gpu import GpuTab
    from tui.widgets.gpu_card import GpuCard

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv(FAKE_ENV, "8:frozen")
    app = panel(tmp_path / "runs", 60)
    async with app.run_test(size=(80, 24)) as pilot:
        tab = app.query_one(GpuTab)
        await wait_until(pilot, lambda: tab.snapshot is not None)
        await pilot.press("f3")
        await wait_until(pilot, lambda: len(tab.query(GpuCard)) == 8)
        await pilot.pause()
        cards = tab.query_one("#gpu-cards")
        table = tab.query_one(DataTable)
        assert cards.max_scroll_y > 0 and cards.outer_size.height <= 12
        assert table.size.height >= 3 and table.region.bottom <= tab.query_one("#gpu-status").region.y
        assert app.focused is table
        await pilot.press("shift+tab")  # back to the GPU list above (focus follows screen order)
        assert app.focused is cards
        await pilot.press("end")
        assert cards.scroll_y > 0


async def test_gpu_tab_without_gpu_shows_the_message(tmp_path, monkeypatch) -> None:
    from textual.widgets import Static

    from tui.tabs.gpu import GpuTab

    monkeypatch.chdir(ROOT)
    if _real_nvml_works():
        monkeypatch.setenv(FAKE_ENV, str(fake_file(tmp_path / "fake.json", error=NO_DRIVER)))
    else:
        monkeypatch.delenv(FAKE_ENV, raising=False)  # the real thing: no driver here
    app = panel(tmp_path / "runs", 0.25)
    async with app.run_test(size=(80, 24)) as pilot:
        tab = app.query_one(GpuTab)
        await wait_until(pilot, lambda: tab.snapshot is not None)
        await pilot.press("f3")
        await pilot.pause()
        message = tab.query_one("#gpu-message", Static)
        assert tab.has_class("-unavailable") and message.display
        assert NO_DRIVER in str(message.render())
        await pilot.press("plus")  # the rest keeps working
        assert tab.interval == 0.5


# ------------------------------------------------------------------------------------------ snapshots


FIXED_HOST = {
    "cpu_percent": 37.5,
    "per_core": [12, 95, 40, 3, 60, 77, 20, 8],
    "cpu_count": 8,
    "load_average": [2.5, 1.75, 1.0],
    "memory_used_gib": 41.5,
    "memory_total_gib": 62.5,
    "swap_used_gib": 0.5,
    "swap_total_gib": 8,
}


def snapshot_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The whole panel on two frozen fake GPUs, with fixed processes; one sample only (interval 60 s)."""
    monkeypatch.chdir(ROOT)
    spec = fake_file(
        tmp_path / "fake_gpus.json",
        [
            {"gpu": 0, "pid": 4190001, "used_memory_gib": 31.2, "name": "python -m engine.runner.worker teacher"},
            {"gpu": 0, "pid": 4190002, "used_memory": 734 * 1024**2, "name": "python notebook.py"},
            {"gpu": 1, "pid": 4190003, "used_memory_gib": 52.9, "name": "vllm serve Qwen/Qwen2.5-7B"},
        ],
        host=FIXED_HOST,
    )
    monkeypatch.setenv(FAKE_ENV, str(spec))
    return panel(tmp_path / "runs", 60)


async def _sampled(pilot) -> None:
    from tui.tabs.gpu import GpuTab

    tab = pilot.app.query_one(GpuTab)
    await wait_until(pilot, lambda: tab.snapshot is not None)


def test_snapshot_gpu_tab_80x24(snap_compare, tmp_path, monkeypatch) -> None:
    app = snapshot_app(tmp_path, monkeypatch)
    assert snap_compare(app, terminal_size=(80, 24), press=["f3"], run_before=_sampled)


def test_snapshot_gpu_tab_120x40(snap_compare, tmp_path, monkeypatch) -> None:
    app = snapshot_app(tmp_path, monkeypatch)
    assert snap_compare(app, terminal_size=(120, 40), press=["f3"], run_before=_sampled)


def test_a_vllm_server_group_is_labelled_even_without_its_worker(worker, tmp_path: Path) -> None:
    """The teacher's vLLM server runs in its own process group and may outlive its worker: its processes
    (leader and children) are found by the pid file the server writes, and a stale pid file is not ours."""
    from engine.core.process import start_ticks_of
    from engine.teacher.vllm_server import PID_FILE_ENV

    pid_file = worker.run.stage_dir("teacher") / "vllm.pid"
    marked = {**os.environ, PID_FILE_ENV: str(pid_file.resolve())}  # as VllmServer.start marks its server
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], start_new_session=True, env=marked)
    try:
        wait_until_true(lambda: len(group_pids(leader.pid)) == 2, timeout=10)
        child = next(pid for pid in group_pids(leader.pid) if pid != leader.pid)
        write_pid_file(pid_file, ProcessRecord.of(leader.pid))
        assert json.loads(pid_file.read_text())["start_ticks"] == start_ticks_of(leader.pid)
        server = f"run {worker.run.id} · teacher · vLLM server"
        labelled = label_processes([GpuProcess(0, leader.pid, GIB), GpuProcess(0, child, GIB)], worker.runs)
        assert [p.label for p in labelled] == [server, server]

        record = json.loads(pid_file.read_text())
        pid_file.write_text(json.dumps(dict(record, start_ticks=record["start_ticks"] + 1)))  # a reused pid
        assert [p.label for p in label_processes([GpuProcess(0, leader.pid, GIB)], worker.runs)] == [None]
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()


def group_pids(pgid: int) -> list[int]:
    from engine.teacher.vllm_server import group_members

    return group_members(pgid)


# ------------------------------------------------------------------- host, per-process CPU/RSS, stop


def test_host_stats_are_sampled_and_become_na_when_psutil_raises(tmp_path, monkeypatch) -> None:
    from engine.gpu import host as host_mod
    from engine.gpu.format import fmt_host
    from tui.tabs.gpu import host_markup

    sampler = Sampler(tmp_path / "runs", backend=FakeBackend(1, frozen=True))
    host = sampler.sample().host
    assert host is not None and host.cpu_count and host.cpu_count >= 1
    assert len(host.per_core) == host.cpu_count and 0 <= host.cpu_percent <= 100
    assert 0 < host.memory_used < host.memory_total and host.swap_total is not None
    assert host.load_average is not None and len(host.load_average) == 3
    text = render_snapshot(sampler.sample())
    assert text.splitlines()[1].startswith("host CPU ") and max(map(len, text.splitlines())) <= 80

    def broken(*args, **kwargs):
        raise RuntimeError("psutil cannot read /proc here")

    for name in ("cpu_percent", "cpu_count", "virtual_memory", "swap_memory"):
        monkeypatch.setattr(host_mod.psutil, name, broken)
    monkeypatch.setattr(host_mod.os, "getloadavg", broken)
    sampler = Sampler(tmp_path / "runs", backend=FakeBackend(1, frozen=True))  # priming fails too: no raise
    snapshot = sampler.sample()
    assert snapshot.error is None and len(snapshot.gpus) == 1
    assert snapshot.host == host_mod.HostStats()  # every field N/A
    assert fmt_host(snapshot.host) == "CPU n/a · load n/a · RAM n/a · swap n/a"
    assert host_markup(snapshot.host).count("n/a") == 4


def test_per_process_cpu_and_rss_of_a_real_child_and_na_when_gone(tmp_path) -> None:
    busy = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nprint('ready', flush=True)\nt = time.time()\nwhile time.time() - t < 30: pass",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert busy.stdout.readline() == "ready\n"  # an interpreter running, not a fork still starting (RSS)
        backend = FakeBackend(
            1,
            frozen=True,
            processes=[
                {"gpu": 0, "pid": busy.pid, "used_memory_gib": 1},
                {"gpu": 0, "pid": 2**22 + 12345, "used_memory_gib": 1, "name": "vanished"},
            ],
        )
        sampler = Sampler(tmp_path / "runs", backend=backend)
        first = {p.pid: p for p in sampler.sample().processes}
        assert first[busy.pid].cpu_percent is None  # CPU % needs two readings...
        assert first[busy.pid].rss > 1024**2  # ...RSS does not
        time.sleep(0.5)
        second = {p.pid: p for p in sampler.sample().processes}
        assert second[busy.pid].cpu_percent > 0 and second[busy.pid].rss > 1024**2
        assert second[busy.pid].create_time is not None and "python" in second[busy.pid].name
        gone = second[2**22 + 12345]
        assert (gone.cpu_percent, gone.rss, gone.name) == (None, None, "vanished")
        text = render_snapshot(sampler.sample())
        assert "n/a" in next(line for line in text.splitlines() if "vanished" in line)
    finally:
        busy.kill()
        busy.wait()
    after = {p.pid: p for p in sampler.sample().processes}
    assert (after[busy.pid].cpu_percent, after[busy.pid].rss) == (None, None)  # it ended: N/A, not an error


def test_our_cpu_only_worker_is_listed_without_a_gpu(worker, tmp_path, monkeypatch, capsys) -> None:
    spec = fake_file(tmp_path / "fake.json", error=NO_DRIVER)
    sampler = Sampler(worker.runs, backend=FakeBackend(spec_path=spec))
    snapshot = sampler.sample()
    assert snapshot.error == NO_DRIVER and snapshot.host is not None and snapshot.host.memory_total
    (ours,) = snapshot.processes
    assert (ours.gpu_index, ours.pid, ours.label, ours.role) == (
        None,
        worker.pid,
        f"run {worker.run.id} · teacher",
        "worker",
    )
    assert ours.rss is not None

    monkeypatch.setenv(FAKE_ENV, str(spec))
    monkeypatch.setenv("TAS_RUNS_DIR", str(worker.runs))
    assert cmd_gpu(gpu_parser().parse_args(["gpu"])) == 1
    captured = capsys.readouterr()
    assert NO_DRIVER in captured.err
    lines = captured.out.splitlines()
    assert lines[0].startswith("host CPU ") and max(map(len, lines)) <= 80
    row = next(line for line in lines if str(worker.pid) in line)
    assert row.split()[0] == "-" and f"run {worker.run.id} · teacher" in row


def test_stopping_refuses_a_foreign_process_and_a_reused_pid(worker) -> None:
    from engine.gpu.control import NotOurs, describe, terminate

    foreign = label_processes([GpuProcess(0, os.getpid(), GIB)], worker.runs)[0]  # pytest: not ours
    with pytest.raises(NotOurs, match="not one of our workers"):
        describe(foreign)
    with pytest.raises(NotOurs, match="not one of our workers"):
        terminate(foreign, worker.runs)
    ours = label_processes([GpuProcess(0, worker.pid, GIB)], worker.runs)[0]
    question, details = describe(ours)
    assert question == f"Send SIGTERM to pid {worker.pid} (run {worker.run.id} · teacher)?"
    assert dict(details)["run"] == worker.run.id
    reused = GpuProcess(
        0,
        worker.pid,
        GIB,
        label=ours.label,
        run_id=ours.run_id,
        stage="teacher",
        role="worker",
        create_time=ours.create_time - 100,
    )  # the pid now belongs to another process
    with pytest.raises(NotOurs, match="another process"):
        terminate(reused, worker.runs)
    assert psutil_alive(worker.pid)


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def test_gpu_tab_k_refuses_a_foreign_process_and_stops_ours_after_confirmation(tmp_path, monkeypatch) -> None:
    """A real `sleep` recorded as the running distill worker of a run (pid file + running status; no
    supervisor): `k` on pytest's own row is refused; on the worker's row it asks, `n` keeps it, `y` stops it
    the way `tas cancel` does (cancel_request.json written, SIGTERM to its process group)."""
    from textual.widgets import DataTable

    from engine.config.load import load_config
    from engine.store.events import EventWriter
    from tui.screens.confirm import ConfirmScreen
    from tui.tabs.gpu import GpuTab

    monkeypatch.chdir(ROOT)
    runs = tmp_path / "runs"
    run = RunStore(runs).create(load_config(TINY_CONFIG), "configs/tiny.yaml")
    # a sleeper whose command line is the run's distill worker's: only such a process is ours to stop
    worker_argv = ["engine.runner.worker", "distill", "--run", str(run.path)]
    sleep = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", *worker_argv], start_new_session=True
    )
    try:
        stage_dir = run.stage_dir("distill")
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_pid_file(stage_dir / "pid", ProcessRecord.of(sleep.pid))
        events = EventWriter(stage_dir / "events.jsonl")
        events.status("running", pid=sleep.pid)
        events.close()
        spec = fake_file(
            tmp_path / "fake.json",
            [
                {"gpu": 0, "pid": sleep.pid, "used_memory_gib": 20},
                {"gpu": 1, "pid": os.getpid(), "used_memory_gib": 1},  # pytest: a foreign process
            ],
        )
        monkeypatch.setenv(FAKE_ENV, str(spec))
        app = panel(runs, 0.25)
        async with app.run_test(size=(80, 24)) as pilot:
            tab = app.query_one(GpuTab)
            await wait_until(pilot, lambda: tab.snapshot is not None)
            await pilot.press("f3")
            table = tab.query_one(DataTable)
            await wait_until(pilot, lambda: row_keys(table) == [f"0:{sleep.pid}", f"1:{os.getpid()}"])

            table.move_cursor(row=1)
            await pilot.press("k")
            await pilot.pause()
            assert not isinstance(app.screen, ConfirmScreen)
            assert any("not one of our workers" in n.message for n in app._notifications)

            table.move_cursor(row=0)
            await pilot.press("k")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            assert app.screen.question == f"Send SIGTERM to pid {sleep.pid} (run {run.id} · distill)?"
            await pilot.press("n")
            await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
            await pilot.pause(0.3)
            assert sleep.poll() is None and not (run.path / "cancel_request.json").exists()

            await pilot.press("k")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await wait_until(pilot, lambda: sleep.poll() is not None)
            assert sleep.returncode == -signal.SIGTERM
            assert (run.path / "cancel_request.json").exists()
            await wait_until(pilot, lambda: any("SIGTERM sent" in n.message for n in app._notifications))
            # the fake still lists the pid on GPU 0, but it is no longer a live worker of ours: N/A, unlabelled
            await wait_until(pilot, lambda: [str(c) for c in table.get_row_at(0)][3:] == ["n/a", "n/a", "?"])
    finally:
        if sleep.poll() is None:
            sleep.kill()
        sleep.wait()
