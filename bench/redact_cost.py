"""Cost of `engine.core.secrets.redact` per log line, with known secrets in the environment.

It runs on every event line and every line a worker prints: this says what that costs.
Prints JSON: microseconds per line for an ordinary line, a line holding a key, and one holding shapes.

    python bench/redact_cost.py [--lines 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from engine.core.secrets import redact

KEY = "Vq7Lm2Xw9Rt4Np8Ks3Hd6Jf1Gb5Cz0Ya"


def per_line_us(line: str, lines: int) -> float:
    redact(line)  # builds the cached matcher
    started = time.perf_counter()
    for _ in range(lines):
        redact(line)
    return round((time.perf_counter() - started) / lines * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20000)
    args = parser.parse_args()
    os.environ["OPENAI_API_KEY"] = KEY
    os.environ["OPENAI_BASE_URL"] = "http://me:Pw9uTq2Lx7Me4Nz@host/v1"
    ordinary = "step 120/400 loss=0.5312 lr=2e-05 the teacher answered prompt p-118 in 1.32 s " * 2
    samples = {
        "ordinary_line_us": ordinary,
        "line_with_a_key_us": f"401: invalid key {KEY} for model m",
        "line_with_shapes_us": "GET http://bob:s3cr3t@h/v1?api_key=abc123 --api-key x Authorization: Bearer abcdef12",
    }
    result = {name: per_line_us(line, args.lines) for name, line in samples.items()}
    result["chars_per_ordinary_line"] = len(ordinary)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
