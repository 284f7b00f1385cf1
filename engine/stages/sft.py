"""Stage `sft`: QLoRA fine-tune of the assistant on the teacher's answers.

Recipe, top to bottom:
1. teacher answers (`teacher.base.output_path`) → conversational prompt/completion records with the
   Assistant system prompt; split train/eval with `train.sft.dataset.{seed,test_size}`;
2. the assistant (`assistant.model.name`) in 4-bit NF4 when `assistant.quantization.load_in_4bit`
   (bitsandbytes; works on CPU too), prepared for k-bit training;
3. a LoRA adapter from `train.sft.peft.lora`;
4. TRL's SFTTrainer, loss on the completion (the answer) only — the original trained on prompt + answer;
5. save the adapter (+ tokenizer) to `train.sft.save_path`, and the merged model to `<save_path>/merged`
   when `train.sft.merge_adapter`.

Checkpoints go to `<save_path>/checkpoints`; a re-run resumes from the newest one. SIGTERM saves a
checkpoint at the end of the current step and ends the stage `cancelled`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.models.device import pick_attention, pick_device, pick_dtype
from engine.models.loading import load_causal_lm, load_tokenizer
from engine.runner.context import StageContext, StageError
from engine.train.arguments import one_gpu, save_trained, trainer_arguments
from engine.train.assistant import merge_lora, quantization_config, trained_dtype
from engine.train.callbacks import CancelCallback, EventsCallback, train_resumable
from engine.train.pairs import load_split_pairs, to_prompt_completion
from engine.train.tracking import training_run


def lora_config(ctx: StageContext, model):
    from peft import LoraConfig

    lora = ctx.config.train.sft.peft.lora
    modules_to_save = lora.modules_to_save
    if modules_to_save:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        # the TAS config says "embed_token"; Qwen's module is "embed_tokens": PEFT would silently skip it
        fixed = [m + "s" if m not in names and m + "s" in names else m for m in modules_to_save]
        unknown = [m for m in fixed if m not in names]
        if fixed != modules_to_save:
            ctx.events.log(
                f"train.sft.peft.lora.modules_to_save: using {fixed} (the model has no {modules_to_save})",
                level="warning",
            )
        if unknown:
            raise StageError(f"train.sft.peft.lora.modules_to_save: the model has no module named {unknown}")
        modules_to_save = fixed
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        modules_to_save=modules_to_save,
        bias=lora.bias,
        task_type=lora.task_type,
        ensure_weight_tying=ties_embeddings(model, modules_to_save),
    )


def ties_embeddings(model, modules_to_save: list[str] | None) -> bool:
    """Whether PEFT must keep the model's tied embeddings tied: Qwen's embed_tokens and lm_head are one matrix.

    Without `ensure_weight_tying`, `modules_to_save` trains a copy of each, so the head and the embeddings
    drift apart (two 233M-parameter copies for Qwen2.5-3B), and older PEFT merged a model that, reloaded
    with its config's tie_word_embeddings, took the untrained embeddings as its head (peft#2777)."""
    if not modules_to_save or not getattr(model.config, "tie_word_embeddings", False):
        return False
    embeddings = (model.get_input_embeddings(), model.get_output_embeddings())
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module in embeddings}
    return any(m in names for m in modules_to_save)


@dataclass
class SftSetup:
    trainer: Any
    cancel: CancelCallback
    tokenizer: Any
    eval_set: Any


def run(ctx: StageContext) -> None:
    setup = prepare(ctx)
    train(ctx, setup)


def prepare(ctx: StageContext) -> SftSetup:
    """Steps 1-3: data, model, LoRA and the trainer, ready to train."""
    from datasets import Dataset
    from peft import prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    config = ctx.config
    sft = config.train.sft
    save_path = Path(sft.save_path)
    checkpoints = save_path / "checkpoints"

    # 1. data
    train_pairs, eval_pairs, system = load_split_pairs(ctx)
    train_set = Dataset.from_list([to_prompt_completion(p, system) for p in train_pairs])
    eval_set = Dataset.from_list([to_prompt_completion(p, system) for p in eval_pairs])
    ctx.events.log(f"{len(train_pairs)} training and {len(eval_pairs)} held-out answers")

    # 2. model
    device = pick_device(config)
    model_cfg = config.assistant.model
    attention, warning = pick_attention(model_cfg.attn_implementation, device)
    if warning:
        ctx.events.log(warning, level="warning")
    tokenizer = load_tokenizer(model_cfg.name, key="assistant.model.name", padding_side="right")
    quant = quantization_config(config, device)
    model = load_causal_lm(
        model_cfg.name,
        key="assistant.model.name",
        dtype=pick_dtype(model_cfg.bfloat16, device) if quant is None else None,
        quantization_config=quant,
        attn_implementation=attention,
        device_map={"": device} if quant is not None else None,
    )
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=device.type == "cuda")
    elif model.device != device:
        model = model.to(device)
    ctx.events.log(
        f"assistant {model_cfg.name} on {device}, {'4-bit ' + quant.bnb_4bit_quant_type if quant else model.dtype}"
    )

    # 3 + 4. LoRA and trainer
    shared, tracking = trainer_arguments(
        ctx,
        sft,
        checkpoints,
        device,
        run_name=sft.experiment.run_name,
        logging_steps=sft.logging_steps,
        seed=sft.dataset.seed,
        bf16=sft.bfloat16,
        fp16=sft.fp16,
    )
    args = SFTConfig(
        **shared,
        max_length=sft.tokenizer.max_length if sft.tokenizer.truncation else None,
        completion_only_loss=True,
    )
    one_gpu(args)
    cancel = CancelCallback(ctx)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set if len(eval_set) else None,  # eval_strategy decides when; the end always
        processing_class=tokenizer,
        peft_config=lora_config(ctx, model),
        callbacks=[EventsCallback(ctx), cancel, *tracking],
    )
    return SftSetup(trainer, cancel, tokenizer, eval_set if len(eval_set) else None)


def train(ctx: StageContext, setup: SftSetup) -> None:
    """Steps 4-5: train (resuming from the newest checkpoint), evaluate, save."""
    sft = ctx.config.train.sft
    save_path = Path(sft.save_path)
    trainer, cancel, tokenizer, eval_set = setup.trainer, setup.cancel, setup.tokenizer, setup.eval_set
    with training_run(trainer):  # one MLflow run (with report_to: mlflow) for training and the last evaluation
        train_resumable(
            ctx,
            trainer,
            cancel,
            save_path / "checkpoints",
            "train.sft.per_device_train_batch_size",
            sft.per_device_train_batch_size,
            sft.overwrite_output_dir,
            "train.sft.overwrite_output_dir",
        )
        # every rank evaluates its share; eval_loss reaches the events through EventsCallback.on_log
        if eval_set is not None:
            trainer.evaluate()

    # 5. save (rank 0 alone writes)
    if not ctx.is_main:
        return
    save_trained(ctx, trainer.model, tokenizer, save_path, "train.sft.save_path", "assistant LoRA adapter")
    if sft.merge_adapter:
        merged_path = save_path / "merged"
        merge_adapter(ctx, save_path, merged_path)
        ctx.events.artifact(merged_path, "merged assistant")


def merge_adapter(ctx: StageContext, adapter_path: Path, out: Path) -> None:
    """Merge the adapter into an unquantized copy of the base model, saved in the dtype sft trained in
    (bfloat16, or float16 on a GPU without it; float32 when the config asks for full precision)."""
    dtype = trained_dtype(ctx.config, pick_device(ctx.config))
    merged = merge_lora(ctx.config.assistant.model.name, adapter_path, dtype)
    merged.save_pretrained(out)
    load_tokenizer(str(adapter_path)).save_pretrained(out)
