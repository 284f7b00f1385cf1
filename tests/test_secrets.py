"""No secret leaks, whole or cut: a key of no known shape, only in `.env`, echoed by a server in its error
bodies (401, 403, 400, 500), placed by padding across every length we cut messages to. Nothing a run
writes and nothing a `tas` command prints may hold the key or any 12-character piece of it."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.core.secrets import clip, redact
from engine.store.runs import RunStore

KEY = "zq9Tk4mWpL2vXr8nB6yHc3JfQa7sDe5G"  # no sk-/hf_ shape: only its value can find it
CUTS = (100, 200, 300, 500)
FRAGMENT = 12


def fragments(secret: str) -> list[str]:
    return [secret[i : i + FRAGMENT] for i in range(len(secret) - FRAGMENT + 1)]


class EchoingServer(ThreadingHTTPServer):
    """An OpenAI-compatible server that answers every request with an error whose body echoes the key,
    after padding chosen so that the key straddles each cut length in turn."""

    def __init__(self, statuses: list[int]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.statuses = itertools.cycle(statuses)
        self.pads = itertools.cycle([cut - offset for cut in CUTS for offset in range(4, 40, 3)])
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        with self.server.lock:
            status, pad = next(self.server.statuses), next(self.server.pads)
        body = json.dumps(
            {
                "error": {
                    "message": "x" * max(pad, 0) + f"invalid key {KEY} (echoed)",
                    "type": "invalid_request_error",
                    "code": status,
                }
            }
        )
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_clip_redacts_before_cutting(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    for cut in CUTS:
        for offset in range(1, len(KEY)):
            text = "p" * (cut - offset) + KEY + " tail"
            clipped = clip(text, cut)
            assert not any(piece in clipped for piece in fragments(KEY)), (cut, offset)
    monkeypatch.setenv("MY_SERVICE_TOKEN", "another-secret-value-1234")
    assert redact("use another-secret-value-1234 here") == "use *** here"


@pytest.mark.e2e
@pytest.mark.parametrize("statuses", [[400, 500], [401], [403]], ids=["400-500", "401", "403"])
def test_a_key_only_in_dotenv_never_leaks(project: Path, statuses: list[int], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    (project / ".env").write_text(f"OPENAI_API_KEY={KEY}\n")
    server = EchoingServer(statuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = load_config(project / "configs" / "tiny.yaml")
        cfg.data.limit = 24
        cfg.teacher.source = "closed"
        cfg.teacher.closed.base_url = server.url
        cfg.teacher.closed.pipeline.max_retries = 1
        cfg.teacher.closed.pipeline.batch_size = 24
        cfg.teacher.closed.pipeline.max_concurrency = 8
        config_path = project / "configs" / "closed.yaml"
        config_path.write_text(cfg.to_yaml())
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        tas = [sys.executable, "-m", "engine.cli.main"]
        started = subprocess.run(
            [*tas, "run", "data", "teacher", "--config", str(config_path), "--name", "leaky"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        outputs = [started.stdout + started.stderr]
        run = RunStore(project / "runs").get("leaky")
        for args in (
            ["status"],
            ["status", "leaky"],
            ["logs", "leaky", "teacher"],
            ["logs", "leaky", "teacher", "--events"],
            ["note", "leaky"],
        ):
            done = subprocess.run([*tas, *args], cwd=project, env=env, capture_output=True, text=True, timeout=60)
            outputs.append(done.stdout + done.stderr)
        assert "failed" in outputs[0] or "no answer" in outputs[0] or "rejected" in outputs[0], outputs[0]
    finally:
        server.shutdown()
    written = [(path, path.read_bytes().decode("utf-8", "replace")) for path in run.path.rglob("*") if path.is_file()]
    assert any(path.name == "worker.log" for path, _ in written)
    if 400 in statuses:  # per-prompt failures keep the (redacted) server message in failures.jsonl
        assert any("invalid key ***" in text for _, text in written), "the server's echo never reached a file"
    else:  # 401 / 403 stop the stage at once, quoting the server
        assert any(f"{statuses[0]}" in text for path, text in written if path.name == "events.jsonl")
    leaks = [str(path) for path, text in written if any(piece in text for piece in fragments(KEY))]
    leaks += [f"tas output {i}" for i, text in enumerate(outputs) if any(piece in text for piece in fragments(KEY))]
    assert not leaks, f"the key (or a {FRAGMENT}-character piece of it) appears in: {leaks}"
