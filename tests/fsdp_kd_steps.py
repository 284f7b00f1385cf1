"""Run by tests/test_fsdp.py: two KD steps of the tiny student, under torchrun with FSDP2 (`--fsdp`) or in
one process, then the trained student saved as the distill stage saves it (engine.train.student.trained_student).

Writes to OUT: `steps.json` (the logged steps, and whether the head was sharded), `model/` (float32) and
`model-bf16/`.

`--untied` gives the student a head of its own (Qwen2.5 from 1.5B up) instead of the tiny model's tied one.
`--reshard-head` makes every FSDP unit reshard after its forward, the head's included: how accelerate
before 1.16 wrapped the root that held the head, and torch's own default for a unit that is not the root.
`--save-every-step` writes the Trainer's checkpoints; `--resume CHECKPOINT` starts from one.
`--on-policy LMBDA` makes that share of the micro-batches on-policy (the student samples the answers).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def let_accelerate_shard_on_cpu() -> None:
    """accelerate 1.16 turns FSDP on only for GPU-type process groups (AcceleratorState: MULTI_GPU, MULTI_XPU,
    ...): with CPU ranks it stays in its MULTI_CPU mode (DDP) and ignores the plugin without a word. torch's
    FSDP2 itself runs on CPU with gloo; after AcceleratorState's own set-up, this does what its GPU branch does."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def reshard_every_unit_after_forward() -> None:
    """accelerate calls torch.distributed.fsdp.fully_shard (looked up when it wraps): force the argument."""
    import torch.distributed.fsdp as fsdp

    fully_shard = fsdp.fully_shard
    fsdp.fully_shard = lambda module, **kwargs: fully_shard(module, **{**kwargs, "reshard_after_forward": True})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--untied", action="store_true")
    parser.add_argument("--reshard-head", action="store_true")
    parser.add_argument("--save-every-step", action="store_true", help="a checkpoint at each step")
    parser.add_argument("--resume", help="the checkpoint folder to resume from")
    parser.add_argument("--on-policy", type=float, default=0.0, metavar="LMBDA")
    options = parser.parse_args()
    if options.fsdp:
        let_accelerate_shard_on_cpu()
    if options.reshard_head:
        reshard_every_unit_after_forward()

    from torch.distributed.tensor import DTensor

    from engine.models.loading import load_causal_lm, load_tokenizer, stop_token_ids
    from engine.train.arguments import sharding
    from engine.train.on_policy import OnPolicy
    from engine.train.student import trained_student
    from tests.helpers import kd_examples, tiny_kd_trainer
    from tests.test_kd_accumulation import ANSWERS

    torch.manual_seed(0)
    tokenizer = load_tokenizer("tiny:assistant", padding_side="right")
    student = load_causal_lm("tiny:student", dtype=torch.float32)
    teacher = load_causal_lm("tiny:assistant", dtype=torch.float32).eval().requires_grad_(False)
    if options.untied:
        head = student.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        student.config.tie_word_embeddings = False
    examples = kd_examples(tokenizer, ANSWERS)

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    on_policy = None
    if options.on_policy:
        stops = frozenset(stop_token_ids(tokenizer, student))
        on_policy = OnPolicy(options.on_policy, 12, 1.0, 0, tokenizer.pad_token_id, stops)
    trainer = tiny_kd_trainer(
        options.out / "checkpoints",
        examples,
        student,
        teacher,
        tokenizer.pad_token_id,
        max_steps=2,
        per_device_train_batch_size=4 // ranks,  # the same global batch of 4 on 1 or 2 ranks
        seed=0,
        kd_weight=0.5,
        chunk_size=8,
        vocab_size=len(tokenizer),
        **sharding(options.fsdp),
        **({"save_strategy": "steps", "save_steps": 1} if options.save_every_step else {}),
        **({"on_policy": on_policy} if on_policy else {}),
    )
    trainer.train(resume_from_checkpoint=options.resume)
    sharded = isinstance(trainer.model.get_output_embeddings().weight, DTensor)
    for dtype, folder in ((torch.float32, "model"), (torch.bfloat16, "model-bf16")):
        final = trained_student(trainer, dtype)  # every rank: under FSDP the gather is a collective
        if final is not None:
            final.save_pretrained(options.out / folder)
    if trainer.accelerator.is_main_process:
        steps = [log for log in trainer.state.log_history if "grad_norm" in log]
        (options.out / "steps.json").write_text(json.dumps({"steps": steps, "sharded": sharded}))


if __name__ == "__main__":
    main()
