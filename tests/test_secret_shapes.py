"""Every shape a secret takes is redacted, on every path out: a key with a trailing newline in the
environment, a `.env` value quoted with a trailing space (the key sent is stripped: the stripped form is
what a server echoes), a URL's password, `api_key=` query values, `--api-key` flags, and pieces of 8 or
more characters of a known key (a server echoing its prefix and its suffix apart). The paths: events,
failures and every file of a run, `tas` output, MLflow's params and config artifact, the chat API
worker's argv, vllm.log and the vLLM server's argv and environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.core.secrets import load_dotenv_secrets, redact, redact_data
from engine.store.runs import RunStore
from tests.helpers import TINY_CONFIG

KEY = "Vq7Lm2Xw9Rt4Np8Ks3Hd6Jf1Gb5Cz0Ya"  # no sk-/hf_ shape: only its value can find it
PASSWORD = "Pw9uTq2Lx7Me4Nz"  # the password of a base URL's userinfo
PIECE = 8


def pieces(secret: str) -> list[str]:
    return [secret[i : i + PIECE] for i in range(len(secret) - PIECE + 1)]


def leaks(text: str) -> list[str]:
    return [piece for piece in pieces(KEY) + pieces(PASSWORD) if piece in text]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ---------------------------------------------------------------------------------------- redact itself


def test_a_key_with_a_trailing_newline_is_redacted_as_it_is_sent(clean_env):
    clean_env.setenv("OPENAI_API_KEY", KEY + "\n")
    assert redact(f"invalid key {KEY}.") == "invalid key ***."  # the server echoes the stripped key


def test_a_dotenv_key_quoted_with_a_trailing_space_is_known_even_where_the_environment_wins(clean_env, tmp_path: Path):
    (tmp_path / ".env").write_text(f'OPENAI_API_KEY="{KEY} "\nOPENAI_BASE_URL=http://me:{PASSWORD}@h/v1\n')
    clean_env.setenv("OPENAI_API_KEY", "another-key-the-environment-sets")
    load_dotenv_secrets(tmp_path)
    assert os.environ["OPENAI_API_KEY"] == "another-key-the-environment-sets"  # .env does not override
    assert redact(f"bad key '{KEY}'; password {PASSWORD}") == "bad key '***'; password ***"


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("GET http://bob:s3cr3t@host:8000/v1/models", "GET http://bob:***@host:8000/v1/models"),
        ("https://x.io/v1?api_key=abc123&model=m", "https://x.io/v1?api_key=***&model=m"),
        ("https://x.io/v1?key=abc123", "https://x.io/v1?key=***"),
        ("https://x.io/v1?a=1&token=abc123#f", "https://x.io/v1?a=1&token=***#f"),
        ("vllm serve m --api-key abc123 --port 8000", "vllm serve m --api-key *** --port 8000"),
        ("vllm serve m --api-key=abc123", "vllm serve m --api-key=***"),
        ("hf download m --hf-token hf_short --token=t0ken", "hf download m --hf-token *** --token=***"),
        ("OpenAI(api_key='abc123')", "OpenAI(api_key='***')"),
        ('{"api_key": "abc 123"}', '{"api_key": "***"}'),
        ("Authorization: Bearer abcdef123456", "Authorization: Bearer ***"),
        ("Authorization: Basic Ym9iOnMzY3IzdA==", "Authorization: Basic ***"),
        ("openai:\n  api_key: abc123", "openai:\n  api_key: ***"),
        ("x-api-key: abc123", "x-api-key: ***"),
        ("{'api_key': 'abc123', 'n': 1}", "{'api_key': '***', 'n': 1}"),
        ("hf_token: abc12345", "hf_token: ***"),
    ],
)
def test_shapes_are_redacted_whatever_the_value(clean_env, text: str, redacted: str):
    assert redact(text) == redacted


def test_ordinary_text_is_left_alone(clean_env):
    text = "max_new_tokens=512 --max-tokens 5 --key=assistant.model.name tokens: 12 loss=0.5 http://host:80/v1"
    assert redact(text) == text
    tokenizer = "pad_token: <|endoftext|> eos_token: '<|im_end|>' max_tokens: 64 basic functionality"
    assert redact(tokenizer) == tokenizer


@pytest.mark.parametrize("before", ["", "u:", "us:", "user:"])
def test_a_known_key_in_base64_is_redacted_at_any_alignment(clean_env, before: str):
    """`Authorization: Basic b64(user:key)` and other encodings put the key at any byte offset."""
    import base64

    clean_env.setenv("OPENAI_API_KEY", KEY)
    encoded = base64.b64encode((before + KEY).encode()).decode()
    redacted = redact(f"sent {encoded} to the server")
    assert encoded not in redacted
    # what is left of the encoded text is at most the 4-character groups that also encode a byte around the
    # key: those before the key's first whole group, and the last partial group with its padding
    kept = redacted.removeprefix("sent ").removesuffix(" to the server")
    assert kept.count("***") == 1, redacted
    head, tail = kept.split("***")
    assert len(head) <= 4 * -(-len(before) // 3) and len(tail) <= 8, redacted


@pytest.mark.parametrize("name", ["DB_PASS", "SMTP_PASSWD", "GCP_CREDENTIALS", "SSH_PASSPHRASE"])
def test_more_names_hold_secrets(clean_env, name: str):
    clean_env.setenv(name, KEY)
    assert redact(f"value {KEY}") == "value ***"


def test_pieces_of_a_known_key_are_redacted(clean_env):
    clean_env.setenv("OPENAI_API_KEY", KEY)
    echoed = f"key starts {KEY[:10]}… and ends …{KEY[-9:]}; middle {KEY[11:19]}"
    assert not leaks(redact(echoed)), redact(echoed)
    assert redact(f"{KEY[:7]} is too short to say anything") == f"{KEY[:7]} is too short to say anything"


def test_config_data_is_redacted_by_name_flag_and_shape(clean_env):
    data = {
        "closed": {"base_url": f"https://me:{PASSWORD}@llm.example.com/v1?api_key=abc123"},
        "vllm": {"extra_args": ["--api-key", KEY, "--hf-token=abc123", "--seed", "3"], "env": {"HF_TOKEN": "x" * 9}},
    }
    assert redact_data(data) == {
        "closed": {"base_url": "https://me:***@llm.example.com/v1?api_key=***"},
        "vllm": {"extra_args": ["--api-key", "***", "--hf-token=***", "--seed", "3"], "env": {"HF_TOKEN": "***"}},
    }


# ---------------------------------------------------------------------- through a run, to every output


class Echo(ThreadingHTTPServer):
    """An OpenAI-compatible server that fails every chat request (400) with a message echoing every shape:
    the key it received (stripped by the client), its prefix and suffix apart, the password of the URL, a
    URL with the key as a query value and a command line with --api-key."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.daemon_threads = True
        self.auth: list[str] = []


class EchoHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.auth.append(self.headers.get("authorization", ""))
        message = (
            f"invalid key {KEY}; it starts {KEY[:12]} and ends {KEY[-12:]}; user me:{PASSWORD} refused; "
            f"see http://127.0.0.1/v1?api_key={KEY} or run `vllm serve --api-key {KEY}`"
        )
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": 400}}).encode()
        self.send_response(400)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.e2e
@pytest.mark.parametrize("where", ["environment", "dotenv"])
def test_no_shape_leaks_from_a_run_through_an_echoing_server(project: Path, clean_env, where: str):
    server = Echo()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    base_url = f"http://me:{PASSWORD}@127.0.0.1:{port}/v1"
    if where == "environment":  # a key pasted with its newline; the base URL with a password
        env.update(OPENAI_API_KEY=KEY + "\n", OPENAI_BASE_URL=base_url)
    else:  # quoted with a trailing space in .env
        (project / ".env").write_text(f'OPENAI_API_KEY="{KEY} "\nOPENAI_BASE_URL={base_url}\n')
    try:
        cfg = load_config(project / "configs" / "tiny.yaml")
        cfg.data.limit = 6
        cfg.teacher.source = "closed"
        cfg.teacher.closed.base_url = None  # from OPENAI_BASE_URL
        cfg.teacher.closed.pipeline.max_retries = 0
        (project / "configs" / "closed.yaml").write_text(cfg.to_yaml())
        tas = [sys.executable, "-m", "engine.cli.main"]
        run_cmd = [*tas, "run", "data", "teacher", "--config", "configs/closed.yaml", "--name", "echo"]
        started = subprocess.run(run_cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
        outputs = [started.stdout + started.stderr]
        for args in (
            ["status"],
            ["status", "echo"],
            ["logs", "echo", "teacher"],
            ["logs", "echo", "teacher", "--events"],
        ):
            done = subprocess.run([*tas, *args], cwd=project, env=env, capture_output=True, text=True, timeout=60)
            outputs.append(done.stdout + done.stderr)
    finally:
        server.shutdown()
    assert server.auth, outputs[0]  # the teacher did reach the server
    run = RunStore(project / "runs").get("echo")
    written = {path: path.read_bytes().decode("utf-8", "replace") for path in run.path.rglob("*") if path.is_file()}
    failures = [text for path, text in written.items() if path.name == "failures.jsonl"]
    assert failures and "invalid key ***" in failures[0], "the server's echo never reached failures.jsonl"
    assert (run.path / "config.yaml") in written  # the saved frozen config is among the files checked
    found = {str(path): leaks(text) for path, text in written.items() if leaks(text)}
    found |= {f"tas output {i}": leaks(text) for i, text in enumerate(outputs) if leaks(text)}
    assert not found, found


# ------------------------------------------------------------------------------------------- MLflow


def test_mlflow_gets_the_redacted_config(tmp_path: Path, clean_env):
    mlflow = pytest.importorskip("mlflow")
    from types import SimpleNamespace

    from engine.runner.context import StageContext
    from engine.store.events import EventWriter
    from engine.train.tracking import FrozenConfigToMlflow

    clean_env.chdir(tmp_path)  # MLflow puts its artifacts in ./mlruns
    cfg = load_config(TINY_CONFIG)
    cfg.teacher.closed.base_url = f"https://me:{PASSWORD}@llm.example.com/v1?api_key={KEY}"
    cfg.teacher.vllm.extra_args = ["--api-key", KEY, "--seed", "3"]
    cfg.teacher.vllm.env = {"HF_TOKEN": "hf-token-value-" + PASSWORD, "VLLM_CPU_KVCACHE_SPACE": "1"}
    run = RunStore(tmp_path / "runs").create(cfg, "tiny.yaml", workdir=str(tmp_path))
    ctx = StageContext("sft", run, run.config(), EventWriter(run.stage_dir("sft") / "events.jsonl"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as active:
        FrozenConfigToMlflow(ctx).on_train_begin(None, SimpleNamespace(is_world_process_zero=True), None)
    params = mlflow.get_run(active.info.run_id).data.params
    assert params["tas.teacher.vllm.extra_args"] == "['--api-key', '***', '--seed', '3']"
    assert params["tas.teacher.vllm.env.HF_TOKEN"] == "***"
    assert params["tas.teacher.closed.base_url"] == "https://me:***@llm.example.com/v1?api_key=***"
    folder = mlflow.artifacts.download_artifacts(
        run_id=active.info.run_id, artifact_path="tas", dst_path=str(tmp_path / "a")
    )
    artifact = (Path(folder) / "config.yaml").read_text()
    assert "VLLM_CPU_KVCACHE_SPACE" in artifact and "--api-key" in artifact
    assert not leaks(json.dumps(params)) and not leaks(artifact)


# ------------------------------------------------------------------------------- chat API worker argv


@pytest.mark.e2e
def test_the_chat_api_worker_gets_the_base_url_by_environment_not_argv(tmp_path: Path, clean_env):
    from engine.chat.client import ChatClient
    from tests.fake_openai import FakeOpenAI

    with FakeOpenAI() as server:
        url = server.url.replace("http://", f"http://me:{PASSWORD}@")
        client = ChatClient("gpt-fake", endpoint=url, log_path=tmp_path / "chat.log").start()
        try:
            argv = Path(f"/proc/{client.process.pid}/cmdline").read_bytes().decode()
            ready = client.wait_ready(timeout=60)  # it found its endpoint
            assert ready.device == f"server {server.url.rsplit('/v1', 1)[0]}"  # shown without the password
        finally:
            client.close()
    assert "engine.chat.api_worker" in argv and not leaks(argv), argv


# ------------------------------------------------------------------------------------------ vLLM server

FAKE_VLLM = (
    'import json, os, sys; json.dump({"argv": sys.argv, "env": dict(os.environ)}, open(os.environ["SEEN"], "w"))'
)


def test_the_vllm_server_gets_its_key_by_environment_and_no_foreign_secret(tmp_path: Path, clean_env):
    from engine.teacher.vllm_server import VllmServer, VllmSettings

    clean_env.setenv("OPENAI_API_KEY", "the-users-own-openai-key")
    clean_env.setenv("WANDB_API_KEY", "the-users-own-wandb-key")
    clean_env.setenv("HF_TOKEN", "hf-token-the-server-needs")
    settings = VllmSettings(
        command=[sys.executable, "-c", FAKE_VLLM],
        model="m",
        extra_args=["--api-key", KEY, "--seed", "3"],
        env={"SEEN": str(tmp_path / "seen.json")},
    )
    server = VllmServer(settings).start(tmp_path / "vllm.log", pid_file=tmp_path / "vllm.pid")
    server.process.wait(timeout=60)
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert "--seed" in seen["argv"] and not leaks(" ".join(seen["argv"]))
    assert seen["env"]["VLLM_API_KEY"] == KEY
    assert seen["env"]["HF_TOKEN"] == "hf-token-the-server-needs"
    assert "OPENAI_API_KEY" not in seen["env"] and "WANDB_API_KEY" not in seen["env"]
    first_line = (tmp_path / "vllm.log").read_text().strip().splitlines()[0]
    assert "start:" in first_line and "--seed 3" in first_line and not leaks(first_line)
    assert not leaks((tmp_path / "vllm.pid").read_text())


def test_a_vllm_key_in_the_command_line_is_redacted_in_the_log(tmp_path: Path, clean_env):
    from engine.teacher.vllm_server import VllmServer, VllmSettings

    settings = VllmSettings(command=[sys.executable, "-c", "pass", "--api-token", KEY], model="m")
    server = VllmServer(settings).start(tmp_path / "vllm.log")
    server.process.wait(timeout=60)
    assert not leaks((tmp_path / "vllm.log").read_text())


def test_a_secret_typed_into_the_config_is_named_and_its_frozen_copy_is_private(tmp_path):
    """A key in the config file itself (not .env) is copied into the run's frozen config, which the workers
    read: `tas run` names the key to move, and the copy is readable by its owner only."""
    from engine.config.keys import set_key
    from engine.config.load import load_config
    from engine.store.runs import RunStore, config_secret_warning

    from .helpers import TINY_CONFIG

    config = load_config(TINY_CONFIG)
    assert config_secret_warning(config, "configs/tiny.yaml") is None

    set_key(config, "teacher.vllm.extra_args", ["--api-key", "sk-typed-into-the-config-12345"])
    warning = config_secret_warning(config, "configs/tiny.yaml")
    assert "teacher.vllm.extra_args" in warning and ".env" in warning
    assert "sk-typed" not in warning
    run = RunStore(tmp_path / "runs").create(config, "configs/tiny.yaml")
    assert (run.path / "config.yaml").stat().st_mode & 0o777 == 0o600
    set_key(config, "teacher.closed.base_url", "http://me:hunter2hunter2@llm.example/v1")
    assert "teacher.closed.base_url" in config_secret_warning(config, "configs/tiny.yaml")
