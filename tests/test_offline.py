"""Offline, a hub model name fails at once (not after a minute of HTTP retries) and names its config key;
a cached one, a local folder and tiny: names still load. Offline means HF_HUB_OFFLINE set, or no
connection to the hub's host (HF_ENDPOINT) within a second."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.models import tiny
from engine.models.loading import ModelNotFound, check_hub_model, load_tokenizer, resolve_model_path
from engine.runner import hub
from engine.runner.supervisor import hub_offline_note

from .helpers import ROOT

HUB_NAME = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connect is refused at once


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch):
    """A process not set offline, with a fresh probe cache; whatever a test turns offline is turned back."""
    import huggingface_hub.constants

    for variable in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_ENDPOINT",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(hub, "_probes", {})
    return monkeypatch


def fails_fast_naming_the_key(call, key: str) -> str:
    began = time.monotonic()
    with pytest.raises(ModelNotFound) as caught:
        call()
    seconds = time.monotonic() - began
    message = str(caught.value)
    assert seconds < 2, f"took {seconds:.1f} s"
    assert message.startswith(f"{key}: cannot load '{HUB_NAME}'"), message
    assert "not in the local Hugging Face cache" in message and "unreachable (offline" in message
    assert f"hf download {HUB_NAME}" in message and f"set {key} to a local model folder" in message
    return message


def test_hf_hub_offline_fails_at_once_with_the_key_path(online):
    online.setenv("HF_HUB_OFFLINE", "1")
    message = fails_fast_naming_the_key(
        lambda: load_tokenizer(HUB_NAME, key="assistant.model.name"), "assistant.model.name"
    )
    assert "HF_HUB_OFFLINE is set" in message
    fails_fast_naming_the_key(
        lambda: resolve_model_path(HUB_NAME, "student.base_model_name", check_hub=True), "student.base_model_name"
    )


def test_unreachable_endpoint_fails_at_once_with_the_key_path(online):
    online.setenv("HF_ENDPOINT", UNREACHABLE)
    message = fails_fast_naming_the_key(
        lambda: check_hub_model(HUB_NAME, "teacher.open.model.name"), "teacher.open.model.name"
    )
    assert "no connection to 127.0.0.1:9" in message
    assert os.environ.get("HF_HUB_OFFLINE") is None  # not cached: nothing to load offline, nothing switched


def test_a_host_that_does_not_answer_is_given_up_on_after_the_timeout(online):
    import socket

    def never_answers(address, timeout=None):
        time.sleep(5)
        raise TimeoutError("timed out")

    online.setattr(socket, "create_connection", never_answers)
    online.setenv("HF_ENDPOINT", "https://hub.example:443")
    began = time.monotonic()
    reason = hub.unreachable_reason(timeout=0.3)
    assert time.monotonic() - began < 1
    assert reason == "offline: no connection to hub.example:443, no answer within 0.3 s"
    began = time.monotonic()
    assert hub.unreachable_reason(timeout=0.3) == reason  # asked once per process
    assert time.monotonic() - began < 0.05


def test_the_probe_goes_to_the_proxy_when_one_applies(online):
    online.setenv("HF_ENDPOINT", "https://hub.example")
    online.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.endpoint() == ("proxy.example", 3128, "proxy proxy.example")
    online.setenv("NO_PROXY", "hub.example")
    assert hub.endpoint() == ("hub.example", 443, "hub.example")


def test_reachable_hub_lets_a_hub_name_through(online):
    import huggingface_hub

    online.setattr(hub, "_connect", lambda host, port, timeout: None)
    online.setattr(huggingface_hub, "repo_exists", lambda name: name == HUB_NAME)  # the hub has it; no network
    assert resolve_model_path(HUB_NAME, "assistant.model.name", check_hub=True) == HUB_NAME
    assert os.environ.get("HF_HUB_OFFLINE") is None


def test_local_folder_and_tiny_names_still_load_offline(online, tmp_path: Path):
    online.setenv("HF_HUB_OFFLINE", "1")
    online.setenv("HF_ENDPOINT", UNREACHABLE)
    assert resolve_model_path("tiny:student", "student.base_model_name", check_hub=True) == str(
        tiny.resolve("tiny:student")
    )
    folder = tmp_path / "my-assistant"
    shutil.copytree(tiny.resolve("tiny:assistant"), folder)
    began = time.monotonic()
    assert load_tokenizer(str(folder), key="assistant.model.name") is not None
    assert load_tokenizer("tiny:assistant", key="assistant.model.name") is not None
    assert time.monotonic() - began < 30  # (no network retries: the tokenizers are read from disk)


def hub_cache_with(cache: Path, repo: str, files_from: Path) -> None:
    """`repo` laid out in a Hugging Face hub cache as a download would leave it (refs/main → a snapshot)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("a" * 40)
    shutil.copytree(files_from, snapshot)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("a" * 40)


def test_a_cached_hub_model_loads_from_the_cache_when_the_hub_is_unreachable(tmp_path: Path):
    """In a fresh process, as a worker meets it: the hub is unreachable, the model is cached: it loads from
    the cache at once (no retries), and the process works offline from then on."""
    cache = tmp_path / "hub"
    hub_cache_with(cache, "someone/cached-assistant", tiny.resolve("tiny:assistant"))
    script = (
        "import os, time\n"
        "from engine.models.loading import load_tokenizer\n"
        "began = time.monotonic()\n"
        "tok = load_tokenizer('someone/cached-assistant', key='assistant.model.name')\n"
        "print(json.dumps({'seconds': time.monotonic() - began, 'offline': os.environ.get('HF_HUB_OFFLINE'),"
        " 'vocab': len(tok)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(cache), HF_ENDPOINT=UNREACHABLE, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", "import json\n" + script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["offline"] == "1" and outcome["vocab"] > 0
    assert outcome["seconds"] < 30, outcome  # transformers' import included; retries alone would be ~50 s
    assert "Retrying" not in result.stderr


def _offline_chat_worker_reply(cwd: Path, *args: str) -> dict:
    """Start the chat worker offline on the hub name, send it nothing: its last reply (JSON line)."""
    result = subprocess.run(
        [sys.executable, "-m", "engine.chat.worker", "--model", HUB_NAME, *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        cwd=cwd,
        input="",
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_chat_worker_fails_at_once_naming_assistant_model_name(tmp_path: Path):
    began = time.monotonic()
    reply = _offline_chat_worker_reply(tmp_path, "--device", "cpu")
    seconds = time.monotonic() - began
    assert reply["kind"] == "error" and reply["fatal"] is True
    message = reply["message"]
    assert message.startswith(f"assistant.model.name (or --model): cannot load '{HUB_NAME}'"), message
    assert "HF_HUB_OFFLINE is set" in message and message.endswith("or tiny:<name>.")  # whole, not clipped
    assert seconds < 20, seconds  # a process start and a few imports; it was ~50 s of hub retries
    keyed = _offline_chat_worker_reply(tmp_path, "--key", "student.base_model_name")
    assert keyed["message"].startswith("student.base_model_name: cannot load")


def test_the_supervisor_runs_a_stage_offline_when_the_hub_is_unreachable(online):
    online.setenv("HF_ENDPOINT", UNREACHABLE)
    env: dict[str, str] = {}
    note = hub_offline_note(env)
    assert env == {"HF_HUB_OFFLINE": "1"}
    assert note is not None and "unreachable" in note and "127.0.0.1:9" in note
    online.setenv("HF_HUB_OFFLINE", "1")  # already offline: nothing to add, nothing to say
    env = {}
    assert hub_offline_note(env) is None and env == {}
    online.delenv("HF_HUB_OFFLINE")
    online.setattr(hub, "_connect", lambda host, port, timeout: None)  # the hub answers
    assert hub_offline_note(env) is None and env == {}


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The hub's model API as huggingface_hub reads it: one model there, every other id answered as the hub
    answers a missing repository (404 + X-Error-Code: RepoNotFound), `broken/*` with a server error."""

    asked: list[str] = []

    def do_GET(self):
        self.asked.append(self.path.split("?")[0])
        if self.path.startswith("/api/models/known/model"):
            body, status, headers = {"id": "known/model", "sha": "0" * 40, "private": False}, 200, {}
        elif self.path.startswith("/api/models/broken/"):
            body, status, headers = {"error": "internal"}, 500, {}
        else:
            body, status, headers = {"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("name", "verdict"),
    [("someone/mistyped-model", "not found"), ("known/model", "ok"), ("broken/model", "ok")],
)
def test_a_reachable_hub_is_asked_whether_the_model_is_there(tmp_path: Path, name: str, verdict: str):
    """Online, a mistyped hub id fails in the check a stage makes before it touches its outputs; a model the
    hub has passes, and a hub error is no verdict (loading decides). A real HTTP server stands in for the hub,
    in a fresh process: huggingface_hub reads HF_ENDPOINT when it is imported."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper() and not k.endswith("_OFFLINE")}
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="5"
    )
    script = (
        "import sys\n"
        "from engine.models.loading import ModelNotFound, check_hub_model\n"
        "try:\n"
        "    check_hub_model(sys.argv[1], 'teacher.open.model.name')\n"
        "    check_hub_model(sys.argv[1], 'teacher.open.model.name')  # the loaders ask again\n"
        "    print('ok')\n"
        "except ModelNotFound as exc:\n"
        "    print('not found:', exc)\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", script, name], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        server.shutdown()
    assert result.stdout.startswith(verdict), result.stdout + result.stderr
    if not name.startswith("broken/"):  # (a server error may be retried)
        assert _FakeHub.asked.count(f"/api/models/{name}") == 1, _FakeHub.asked  # once per process
    if verdict == "not found":
        assert f"teacher.open.model.name: '{name}' is neither a local folder nor a model on the Hugging Face hub" in (
            result.stdout
        )
        assert "check the spelling" in result.stdout
