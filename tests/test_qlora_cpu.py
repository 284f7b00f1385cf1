"""QLoRA on CPU survives the Trainer's rhythm: train, evaluate, train (what the tiny sft does each epoch).

bitsandbytes 0.49.0-0.50.2 break it on CPUs with avx512_bf16 (pyproject.toml excludes them); the check is
forced onto that code path, so it fails with those releases on any CPU. See tests/qlora_train_eval_train.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .helpers import ROOT


@pytest.mark.train
def test_4bit_lora_trains_the_same_after_an_evaluation():
    script = ROOT / "tests" / "qlora_train_eval_train.py"
    done = subprocess.run(
        [sys.executable, str(script), "--force-avx512bf16"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is None, result
    assert result["loss_after"] == pytest.approx(result["loss_before"], abs=1e-6), result
    assert result["same_grads"], result
