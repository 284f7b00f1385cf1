"""A stand-in chat worker process for the Chat tab's tests: the protocol of engine.chat.worker, no model.

Run as `fake_chat_worker.py <anything> --model NAME ...` (what ChatClient starts, with this file as its
`python`: see tests/test_chat_tab.py): says `ready` for NAME at once, answers each `generate` with
`max_new_tokens` tokens ("NAME:1 NAME:2 ...") one every TOKEN_S seconds, honours `stop`, exits on EOF.
Plain stdlib and JSON: it starts in a few tens of milliseconds.
"""

import json
import os
import sys
import threading
import time

TOKEN_S = float(os.environ.get("FAKE_CHAT_TOKEN_S", "0.05"))
out_lock = threading.Lock()
stopped: set[str] = set()


def say(**reply) -> None:
    with out_lock:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def generate(model: str, request: dict) -> None:
    rid, start = request["id"], time.monotonic()
    count = int((request.get("params") or {}).get("max_new_tokens", 16))
    sent = 0
    for sent in range(1, count + 1):
        if rid in stopped:
            sent -= 1
            break
        say(kind="token", id=rid, text=f"{model}:{sent} ")
        time.sleep(TOKEN_S)
    elapsed = time.monotonic() - start
    stop = rid in stopped
    say(
        kind="end",
        id=rid,
        tokens=sent,
        ttft_s=0.01,
        tokens_per_s=round(sent / elapsed, 1) if elapsed else None,
        elapsed_s=round(elapsed, 3),
        prompt_tokens=len(request.get("messages") or []),
        stopped=stop,
        finish="stopped" if stop else "length",
    )


def main() -> None:
    args = sys.argv[1:]
    model = args[args.index("--model") + 1] if "--model" in args else "fake"
    name = os.path.basename(model.rstrip("/")) or model
    say(
        kind="ready",
        model=model,
        device="cpu",
        dtype="float32",
        template="chat",
        load_s=0.0,
        threads=1,
        pid=os.getpid(),
    )
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "generate":
            threading.Thread(target=generate, args=(name, request), daemon=True).start()
        elif request.get("op") == "stop":
            stopped.add(request.get("id"))


if __name__ == "__main__":
    main()
