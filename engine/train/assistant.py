"""The assistant as the stages after `sft` see it: the base model (4-bit when configured) plus its adapter.

`sft` trains the adapter; `distill` uses the tuned assistant as the KD teacher; `eval` scores it and
measures the students' KL to it. One loader, so all three see the same model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config.schema import TASConfig
from engine.models.device import pick_dtype
from engine.models.loading import load_causal_lm, load_tokenizer
from engine.runner.context import StageContext


def quantization_config(config: TASConfig, device: torch.device):
    """4-bit NF4/FP4 settings of `assistant.quantization`, or None when the assistant loads unquantized.

    The compute dtype is what `quantization.bfloat16` means on `device` (`pick_dtype`): float16 on a GPU
    without native bfloat16 (V100, T4), where bfloat16 matmuls are emulated, slowly."""
    from transformers import BitsAndBytesConfig

    q = config.assistant.quantization
    if not q.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=pick_dtype(q.bfloat16, device),
    )


def trained_dtype(config: TASConfig, device: torch.device) -> torch.dtype:
    """The dtype the assistant's weights computed in during `sft` on `device`: the 4-bit compute dtype when
    quantized, else the dtype it was loaded in. Its merged copy is saved in it."""
    q = config.assistant.quantization
    return pick_dtype(q.bfloat16 if q.load_in_4bit else config.assistant.model.bfloat16, device)


def merge_lora(base_name: str, adapter: str | Path, dtype: torch.dtype | None = None):
    """The base model with the LoRA adapter merged in, cast to `dtype` (None: float32).

    The base loads in float32 for the merge: 4-bit weights cannot be merged, and the small LoRA deltas would
    be lost in a half-precision sum. Tied embeddings stay tied (`ensure_weight_tying` in the adapter)."""
    from peft import PeftModel

    base = load_causal_lm(base_name, key="assistant.model.name", dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    return merged.to(dtype) if dtype is not None else merged


def load_tuned_assistant(ctx: StageContext, device: torch.device, *, with_adapter: bool = True):
    """The assistant with its SFT adapter, frozen, in eval mode; plus its tokenizer.

    `with_adapter=False` gives the base assistant as `sft` started from (eval's "before SFT" row)."""
    config = ctx.config
    name = config.assistant.model.name
    quant = quantization_config(config, device)
    model = load_causal_lm(
        name,
        key="assistant.model.name",
        quantization_config=quant,
        dtype=None if quant else pick_dtype(config.assistant.model.bfloat16, device),  # as configured
        device_map={"": device} if quant else None,
    )
    adapter = Path(config.train.sft.save_path)
    if with_adapter and (adapter / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).get_base_model()  # LoRA layers stay injected
        ctx.events.log(f"KD teacher: {name} + SFT adapter {adapter}")
    elif with_adapter:
        ctx.events.log(
            f"no SFT adapter in {adapter} (train.sft.save_path): distilling from the base assistant", level="warning"
        )
    if not quant:
        model = model.to(device)
    model.eval().requires_grad_(False)
    return model, load_tokenizer(name, key="assistant.model.name", padding_side="right")
