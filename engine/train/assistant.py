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


def quantization_config(config: TASConfig):
    """4-bit NF4/FP4 settings of `assistant.quantization`, or None when the assistant loads unquantized."""
    from transformers import BitsAndBytesConfig

    q = config.assistant.quantization
    if not q.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16 if q.bfloat16 else torch.float32,
    )


def load_tuned_assistant(ctx: StageContext, device: torch.device, *, with_adapter: bool = True):
    """The assistant with its SFT adapter, frozen, in eval mode; plus its tokenizer.

    `with_adapter=False` gives the base assistant as `sft` started from (eval's "before SFT" row)."""
    config = ctx.config
    name = config.assistant.model.name
    quant = quantization_config(config)
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
