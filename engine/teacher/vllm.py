"""The vLLM teacher (`teacher.source: vllm`): the open teacher served by vLLM, asked like a closed one.

The teacher stage calls `answer_vllm` with the prompts not yet answered. It

1. resolves `teacher.open.model.name` to a local folder (`tiny:teacher` works, like the open teacher);
2. starts a vLLM OpenAI-compatible server for it (engine/teacher/vllm_server.py) from the vLLM venv's
   python (`teacher.vllm.python`, `$TAS_VLLM_PYTHON` overrides it), in a process group of its own,
   logging to `<stage_dir>/vllm.log`, its pid in `<stage_dir>/vllm.pid` (a server left behind by an
   earlier worker of the same run is ended first);
3. waits for /health (`teacher.vllm.startup_timeout_s`); a server that dies on the way fails the
   stage with a StageError quoting the server's own error line;
4. sends the prompts through the closed teacher's client (engine/teacher/closed.py) pointed at the
   server (`ask_server`), with the open teacher's sampling (do_sample, temperature, top_p, top_k,
   max_new_tokens) and as many requests in flight as the server runs at once (`in_flight`), a new one
   as soon as one ends: resume by prompt id, failures.jsonl, progress and cancel come from there;
5. stops the server on every way out: done, error, cancel (SIGTERM sets ctx.cancel_event).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from engine.config.schema import TASConfig
from engine.models.loading import ModelNotFound, resolve_model_path
from engine.runner.context import StageCancelled, StageContext, StageError
from engine.teacher.output import TeacherOutput
from engine.teacher.vllm_server import VllmError, VllmServer, VllmSettings

PYTHON_ENV = "TAS_VLLM_PYTHON"
LOG_FILE = "vllm.log"
PID_FILE = "vllm.pid"
PLACEHOLDER_KEY = "EMPTY"
"""The API key the closed client sends to our own server (vLLM ignores it): never a real key."""

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def vllm_python(config: TASConfig, workdir: str | Path) -> str:
    """$TAS_VLLM_PYTHON, else `teacher.vllm.python`; a relative path is relative to the run's working
    directory, else to the project checkout (where scripts/build-vllm-env.sh puts `.venv-vllm`)."""
    python = os.environ.get(PYTHON_ENV) or config.teacher.vllm.python
    path = Path(python).expanduser()
    if path.is_absolute():
        return str(path)
    for base in (Path(workdir), PROJECT_ROOT):
        if (base / path).exists():
            return str((base / path).absolute())
    return str((Path(workdir) / path).absolute())


def server_settings(config: TASConfig, workdir: str | Path) -> VllmSettings:
    """What the server is started with, from `teacher.open.model.name` and `teacher.vllm`."""
    name = config.teacher.open.model.name
    try:
        model = resolve_model_path(name, "teacher.open.model.name")
    except ModelNotFound as exc:
        raise StageError(str(exc)) from None
    v = config.teacher.vllm
    env = dict(v.env)  # the worker's own environment (CUDA_VISIBLE_DEVICES included) is inherited
    return VllmSettings(
        model=model,
        python=vllm_python(config, workdir),
        served_model_name=name,
        tensor_parallel_size=v.tensor_parallel_size,
        data_parallel_size=v.data_parallel_size,
        max_num_seqs=v.max_num_seqs,
        gpu_memory_utilization=v.gpu_memory_utilization,
        max_model_len=v.max_model_len,
        dtype=v.dtype,
        enforce_eager=v.enforce_eager,
        extra_args=list(v.extra_args),
        env=env,
    )


def in_flight(config: TASConfig) -> int:
    """Requests kept in flight: `teacher.vllm.max_concurrency` when set, else what the server runs at once
    (`max_num_seqs` per replica): fewer leave its batch part empty, more only wait in its queue."""
    v = config.teacher.vllm
    return v.max_concurrency or v.max_num_seqs * v.data_parallel_size


def closed_config(config: TASConfig, base_url: str) -> TASConfig:
    """A copy of the config whose `teacher.closed` asks our server, with the open teacher's sampling.

    `do_sample: false` (or temperature 0) is greedy decoding, as in the open teacher: temperature 0."""
    pipeline = config.teacher.open.pipeline
    copy = config.model_copy(deep=True)
    closed = copy.teacher.closed
    closed.base_url = base_url
    closed.model.name = config.teacher.open.model.name  # the server's --served-model-name
    closed.pipeline.temperature = pipeline.temperature if pipeline.do_sample else 0.0
    closed.pipeline.top_p = pipeline.top_p
    closed.pipeline.max_tokens = pipeline.max_new_tokens
    closed.pipeline.max_concurrency = in_flight(config)
    closed.pipeline.use_batch_api = False  # vLLM serves chat completions, not OpenAI's Batch API
    return copy


def vllm_fields(config: TASConfig, stop_ids: list[int]) -> dict:
    """What the open teacher honours that OpenAI's chat API has no field for, as vLLM's own request fields
    (sent in the body's extra fields): top_k (0: no cut-off, vLLM's -1), the ids answers stop at, and the
    chat template's generation prompt and special-token decoding of teacher.open.tokenizer."""
    open_ = config.teacher.open
    return {
        "top_k": open_.pipeline.top_k or -1,
        "stop_token_ids": stop_ids,
        "add_generation_prompt": open_.tokenizer.add_generation_prompt,
        "skip_special_tokens": open_.tokenizer.skip_special_tokens,
    }


def ask_server(
    ctx: StageContext,
    base_url: str,
    stop_ids: list[int],
    prompts: list[dict],
    output: TeacherOutput,
    system_prompt: str | None,
) -> dict:
    """Answer `prompts` through the vLLM server at `base_url`; returns answer_closed's summary."""
    from engine.teacher.closed import answer_closed

    vllm_ctx = StageContext(
        ctx.stage,
        ctx.run,
        closed_config(ctx.config, base_url),
        ctx.events,
        ctx.rank,
        ctx.world_size,
        ctx.cancel_event,
    )
    with placeholder_api_key():
        return answer_closed(vllm_ctx, prompts, output, system_prompt, extra_body=vllm_fields(ctx.config, stop_ids))


@contextlib.contextmanager
def placeholder_api_key() -> Iterator[None]:
    """OPENAI_API_KEY = "EMPTY" for the duration: a real key in the environment is not sent to our server."""
    before = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = PLACEHOLDER_KEY
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = before


def teacher_stop_ids(config: TASConfig, model_path: str) -> list[int]:
    """The ids the teacher's answers end at, as the HF path stops (engine.models.loading.stop_token_ids).

    vLLM stops at the tokenizer's and generation config's EOS only, and matches `stop` strings against text
    that has its special tokens removed: `<|im_end|>` is only seen as an id (vLLM's `stop_token_ids`)."""
    from engine.models.loading import load_tokenizer, stop_token_ids

    tokenizer = load_tokenizer(
        model_path, key="teacher.open.model.name", trust_remote_code=config.teacher.open.model.trust_remote_code
    )
    return stop_token_ids(tokenizer, None, config.teacher.open.tokenizer.additional_special_tokens)


def answer_vllm(ctx: StageContext, prompts: list[dict], output: TeacherOutput, system_prompt: str | None) -> dict:
    """Answer `prompts` with the open teacher served by vLLM; returns answer_closed's summary.

    Must run in the worker's main thread (the server's death signal follows the thread that started it).
    """
    config = ctx.config
    v = config.teacher.vllm
    settings = server_settings(config, ctx.run.workdir)
    log_path, pid_file = ctx.stage_dir / LOG_FILE, ctx.stage_dir / PID_FILE
    ctx.check_cancelled()
    server = VllmServer(settings)
    # stop within the run's cancel grace period, before the launcher SIGKILLs the worker
    stop_grace_s = max(2.0, min(30.0, config.launch.cancel_grace_s / 2))
    try:
        try:
            server.start(log_path, pid_file)
        except VllmError as exc:
            raise StageError(f"teacher.vllm: {exc}") from None
        rpc = f", replicas' RPC port {server.rpc_port}" if server.rpc_port else ""
        ctx.events.log(
            f"vLLM server for {config.teacher.open.model.name} starting (pid {server.pid}, port {server.port}{rpc}); "
            f"log: {log_path}"
        )
        try:
            healthy = server.wait_healthy(v.startup_timeout_s, cancel=ctx.cancel_event)
        except VllmError as exc:
            raise StageError(f"teacher.vllm: {exc}") from None
        if not healthy:
            raise StageCancelled("cancelled by request while the vLLM server was starting")
        ctx.events.log(f"vLLM server ready at {server.base_url}, {in_flight(config)} requests in flight")
        stops = teacher_stop_ids(config, settings.model)
        ctx.events.log(
            f"answers end at token ids {stops} (EOS, the chat template's end of turn, "
            "teacher.open.tokenizer.additional_special_tokens)"
        )
        return ask_server(ctx, server.base_url, stops, prompts, output, system_prompt)
    finally:
        if server.process is not None:
            server.stop(grace_s=stop_grace_s)
            ctx.events.log("vLLM server stopped")
