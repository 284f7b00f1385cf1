"""Run as a script by tests/test_qlora_cpu.py, in a process of its own (it re-registers a bitsandbytes kernel).

A 4-bit QLoRA assistant, as the sft stage builds it, takes a training step's loss and gradients, then an
evaluation (eval mode, no_grad: what the Trainer does at each epoch end), then the same batch again. The
second loss and gradients must equal the first. Prints one JSON line.

bitsandbytes 0.49.0-0.50.2 take a CPU inference path on CPUs with avx512_bf16: the first eval-mode,
no-grad call of a Linear4bit repacks its weight for a fused kernel (`packing_format_for_cpu`) and nothing
repacks it back for training, so every later call goes to `gemv_4bit`, which has no backward: a layer with a
bias fails (`result += bias`: "a view of a leaf Variable that requires grad is being used in an in-place
operation"), one without silently drops the gradient to its input. `--force-avx512bf16` makes bitsandbytes
believe the CPU has the feature, so the check bites on any CPU; on releases without that path it changes
nothing.
"""

from __future__ import annotations

import importlib
import json
import sys

import torch


def force_avx512bf16_path() -> None:
    import bitsandbytes.functional as functional
    import bitsandbytes.nn.modules as modules

    if not hasattr(modules, "has_avx512bf16"):
        return  # a release without the fused CPU path
    functional.has_avx512bf16 = modules.has_avx512bf16 = lambda: True
    import bitsandbytes.backends.cpu.ops as cpu_ops

    importlib.reload(cpu_ops)  # registers the fused gemv_4bit CPU kernel, which it does only `if has_avx512bf16()`


def main() -> None:
    if "--force-avx512bf16" in sys.argv:
        force_avx512bf16_path()
    import bitsandbytes
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from engine.models import tiny

    torch.manual_seed(0)
    path = tiny.resolve("tiny:assistant")
    tokenizer = AutoTokenizer.from_pretrained(path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # q/k/v_proj carry a bias in Qwen2, as in the real assistant: the failing `+= bias` is theirs
    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
    )
    batch = tokenizer(
        ["def add_7(x):\n    return x + 7\n", "def first_3(s):\n    return s[:3]\n"], return_tensors="pt", padding=True
    )
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor]]:
        model.train()
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before, grads_before = loss_and_grads()
    model.eval()
    with torch.no_grad():
        model(**batch)
    error = None
    try:
        after, grads_after = loss_and_grads()
    except RuntimeError as exc:
        error, after, grads_after = str(exc), float("nan"), {}
    same_grads = bool(grads_after) and all(
        torch.allclose(grads_before[n], grads_after[n], atol=1e-6) for n in grads_before
    )
    print(
        json.dumps(
            {
                "bitsandbytes": bitsandbytes.__version__,
                "loss_before": before,
                "loss_after": after,
                "same_grads": same_grads,
                "error": error,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
