"""Can this process reach the Hugging Face hub? Answered in about a second, not after a minute of retries.

Light module (stdlib only): the supervisor asks before each stage, the model loader before resolving a hub
id. The hub counts as unreachable when `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set, or when a TCP
connect to its host (`HF_ENDPOINT`, default https://huggingface.co; through the proxy of `HTTPS_PROXY` /
`HTTP_PROXY` / `ALL_PROXY` when one applies) does not succeed within PROBE_TIMEOUT_S. Name resolution
counts towards the timeout (the probe runs in a thread we stop waiting for).

Unreachable, a process should *work offline* (`work_offline`): huggingface_hub, transformers and
datasets then use their caches without trying the network, so a cached model loads at once and one that
is not cached fails at once, instead of after ~50 s of HTTP retries.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 1.0
DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "ON", "YES", "TRUE"}
_probes: dict[tuple[str, int], str | None] = {}  # (host, port) -> why it failed, None when it answered
_lock = threading.Lock()


def offline_flag() -> str | None:
    """The setting that puts this process offline (`HF_HUB_OFFLINE is set`), or None."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().upper() in _TRUE:
            return f"{variable} is set"
    constants = sys.modules.get("huggingface_hub.constants")  # set in code (tests, work_offline)
    if constants is not None and getattr(constants, "HF_HUB_OFFLINE", False) is True:
        return "HF_HUB_OFFLINE is set"
    return None


def endpoint() -> tuple[str, int, str]:
    """(host, port, what it is) to connect to for the hub: its endpoint, or the proxy in front of it."""
    url = urlsplit(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    scheme = url.scheme or "https"
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if scheme == "https" else 80)
    proxy = _proxy_for(scheme, host)
    if proxy:
        purl = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if purl.hostname:
            return purl.hostname, purl.port or (443 if purl.scheme == "https" else 80), f"proxy {purl.hostname}"
    return host, port, host


def _proxy_for(scheme: str, host: str) -> str | None:
    names = (f"{scheme}_proxy", "all_proxy")
    proxy = next(
        (
            os.environ.get(n) or os.environ.get(n.upper())
            for n in names
            if os.environ.get(n) or os.environ.get(n.upper())
        ),
        None,
    )
    if not proxy:
        return None
    from urllib.request import proxy_bypass_environment

    return None if proxy_bypass_environment(host) else proxy


def unreachable_reason(timeout: float = PROBE_TIMEOUT_S, fresh: bool = False) -> str | None:
    """Why the hub cannot be used now ("offline: HF_HUB_OFFLINE is set", "offline: no connection to
    huggingface.co:443, Connection refused"), or None when it answered. The connect probe is made once per process and
    endpoint (`fresh` makes it again)."""
    flag = offline_flag()
    if flag:
        return f"offline: {flag}"
    host, port, what = endpoint()
    with _lock:
        if fresh or (host, port) not in _probes:
            _probes[(host, port)] = _connect(host, port, timeout)
        failure = _probes[(host, port)]
    return None if failure is None else f"offline: no connection to {what}:{port}, {failure}"


def _connect(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to host:port opens within `timeout` (name lookup included), else why not."""
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc.strerror or str(exc) or type(exc).__name__)

    thread = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def work_offline() -> None:
    """From now on this process (and the processes it starts) uses only the Hugging Face caches."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True
