"""Each stage's predicted peak memory on one GPU, term by term, and the config keys that would make it fit.

Every figure is per rank, i.e. per GPU: under torchrun (`launch.nproc_per_node` > 1) DDP gives each rank a
whole copy of the model, its gradients and optimizer states, plus DDP's gradient buckets; only the data is
split. The sizes come from the models' config.json (engine.plan.dims), the batch and lengths from the config.
The activation figures were measured (the bytes autograd saves per token and layer, for Qwen2 layers of
several widths, in float32 and under bfloat16 autocast) and the tests hold the plan to within 25 % of the
tiny stages' measured peaks on CPU, and to the figures of issue 22 for the root config's models.

Long sequences are counted at their limit (`max_length`, `max_new_tokens`): the plan is for the worst batch,
the one that would fail an hour in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config.keys import get_key, set_key
from engine.config.schema import TASConfig
from engine.pipeline.models import ASSISTANT_BASE
from engine.plan.dims import ModelDims, load_dims

GIB = 1024**3
CUDA_RESERVE = GIB
"""Per GPU, not ours to plan: the CUDA context, cuBLAS workspaces, NCCL buffers, allocator fragmentation."""

PROMPT_TOKENS = 128
"""A teacher prompt in tokens: the system prompt and a short instruction through the chat template."""

CODE_PROMPT_TOKENS = 256
"""A code benchmark problem's prompt in tokens (HumanEval's longest are about this)."""

CHUNK_TENSORS = 6
"""(chunk, vocab) float32 tensors alive at once in a KD loss chunk's backward (engine/train/kd_loss.py): the
student's logits and log-probs, the teacher's logits and probs, the KL terms, the logits' gradient."""

SFT_LOSS_TILE = (4096, 32768)
"""TRL's fused lm-head loss (trl/kernels/chunked_logprob.py): logits exist one [tokens × vocab] tile at a time."""


def activation_bytes(dims: ModelDims, mixed: bool) -> int:
    """Bytes autograd keeps per token for one decoder layer's backward (measured, see the module docstring).

    Under bf16 autocast (float32 weights): 30 B per hidden unit (float32 residual stream and norms, bf16 inputs
    of the projections, rotary q/k, attention output), 8 per MLP unit, 4 per key/value unit, the attention's
    log-sum-exp; in float32 everything is 4 bytes and nothing is cast: 32 / 16 / 8.
    """
    h, i, kv = dims.hidden, dims.intermediate, dims.kv_heads * dims.head_dim
    per = (30 * h + 8 * i + 4 * kv) if mixed else (32 * h + 16 * i + 8 * kv)
    return per + 4 * dims.heads + 8


@dataclass(frozen=True)
class Term:
    """One line of a plan: what holds memory, how much, and the arithmetic a user can check."""

    what: str
    bytes: int
    why: str


@dataclass
class StagePlan:
    stage: str
    terms: list[Term] = field(default_factory=list)
    note: str = ""  # what the reader should know (e.g. "no GPU: the API answers")
    gpu: bool = True  # False: the stage uses no GPU memory (closed teacher, download, data)

    @property
    def peak(self) -> int:
        return sum(term.bytes for term in self.terms)


DimsOf = Callable[[str, str], ModelDims]


# ------------------------------------------------------------------------------------------- helpers


def gib(n: float) -> str:
    """Bytes for a reader: GiB, MiB or KiB, whichever keeps a digit or two."""
    if n >= GIB / 10:
        return f"{n / GIB:.1f} GiB"
    return f"{n / 1024**2:.0f} MiB" if n >= 1024**2 else f"{n / 1024:.0f} KiB"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def four_bit_bytes(dims: ModelDims, double_quant: bool) -> int:
    """The linear layers in NF4/FP4: half a byte per weight plus one absmax per block of 64 weights (float32,
    or with double quantization 8-bit with a float32 constant per 256 blocks)."""
    n = dims.linear_params
    constants = n // 64 + (n // (64 * 256)) * 4 if double_quant else (n // 64) * 4
    return n // 2 + constants


def lora_params(dims: ModelDims, r: int, targets: str | list[str]) -> int:
    """r·(in + out) per adapted linear layer: "all-linear" adapts every decoder linear layer."""
    names = None if targets == "all-linear" else set([targets] if isinstance(targets, str) else targets)
    per_layer = sum(r * (n_in + n_out) for name, n_in, n_out in dims.linear_shapes() if names is None or name in names)
    return dims.layers * per_layer


def _saved_copies(dims: ModelDims, modules_to_save: list[str] | None) -> int:
    """Embedding matrices peft trains a full copy of (`modules_to_save`: lm_head, embed_tokens). Tied
    embeddings stay tied (sft's `ensure_weight_tying`): one trained copy serves both."""
    copies = len({m.rstrip("s") for m in modules_to_save or []} & {"lm_head", "embed_token"})
    return min(copies, 1 if dims.tied else 2) * dims.vocab * dims.hidden


def _ranks(config: TASConfig) -> int:
    return config.launch.nproc_per_node


def _fsdp(config: TASConfig) -> bool:
    """The student sharded over the ranks (`train.distillation.fsdp`)."""
    return config.train.distillation.fsdp


def student_dims(config: TASConfig, dims_of: DimsOf) -> ModelDims:
    """The student: student.base_model_name's own shape (pretrained), else student.* with the assistant's vocab."""
    kd = config.train.distillation
    if kd.student_init == "pretrained":
        return dims_of(config.student.base_model_name, "student.base_model_name")
    a = dims_of(config.assistant.model.name, "assistant.model.name")
    s = config.student
    heads = s.num_attention_heads
    return ModelDims(
        name="student.*",
        hidden=s.hidden_size,
        intermediate=s.intermediate_size,
        layers=s.num_hidden_layers,
        heads=heads,
        kv_heads=a.kv_heads if heads % a.kv_heads == 0 else heads,
        head_dim=s.hidden_size // heads,
        vocab=a.vocab,
        tied=a.tied,
        qkv_bias=True,
        layer_norm=False,
    )


def _assistant_weights(config: TASConfig, a: ModelDims, trainable_copies: bool) -> list[Term]:
    """The assistant as loaded: 4-bit linear layers (quantization.load_in_4bit) or all in its dtype."""
    q = config.assistant.quantization
    if q.load_in_4bit:
        # sft's prepare_model_for_kbit_training casts the rest to float32; distill and eval keep bf16
        rest = 4 if trainable_copies else 2
        return [
            Term(
                "assistant linear layers, 4-bit",
                four_bit_bytes(a, q.bnb_4bit_use_double_quant),
                f"{_count(a.linear_params)} weights × 0.5 B + block constants",
            ),
            Term(
                "assistant embeddings and norms",
                (a.embedding_params + a.other_params) * rest,
                f"{_count(a.embedding_params + a.other_params)} × {rest} B (not quantized)",
            ),
        ]
    size = 2 if config.assistant.model.bfloat16 else 4
    return [Term("assistant weights", a.params * size, f"{_count(a.params)} parameters × {size} B")]


def _ddp_buckets(config: TASConfig, trainable: int, size: int = 4) -> list[Term]:
    if _ranks(config) == 1 or _fsdp(config):
        return []
    return [
        Term(
            "DDP gradient buckets",
            trainable * size,
            f"a second copy of the gradients, all-reduced ({_ranks(config)} ranks)",
        )
    ]


# -------------------------------------------------------------------------------------------- stages


def teacher_plan(config: TASConfig, dims_of: DimsOf) -> StagePlan:
    t = config.teacher
    if t.source in ("closed", "download"):
        return StagePlan("teacher", note=f"teacher.source: {t.source}: no GPU memory", gpu=False)
    d = dims_of(t.open.model.name, "teacher.open.model.name")
    p = t.open.pipeline
    size = 2 if t.open.model.bfloat16 else 4
    if t.source == "vllm":
        v = t.vllm
        utilization = v.gpu_memory_utilization or 0.9
        return StagePlan(
            "teacher",
            [
                Term(
                    "teacher weights (vLLM)",
                    d.params * size // v.tensor_parallel_size,
                    f"÷ {v.tensor_parallel_size} GPUs",
                )
            ],
            note=f"vLLM then takes {utilization:.0%} of each GPU (teacher.vllm.gpu_memory_utilization) for its KV cache",
        )
    length = PROMPT_TOKENS + p.max_new_tokens
    kv_per_token = d.kv_bytes_per_token * size // 2
    return StagePlan(
        "teacher",
        [
            Term("teacher weights", d.params * size, f"{_count(d.params)} parameters × {size} B"),
            Term(
                "KV cache",
                p.batch_size * length * kv_per_token,
                f"{p.batch_size} prompts (teacher.open.pipeline.batch_size) × {length} tokens × "
                f"{kv_per_token // 1024} KiB",
            ),
            Term(
                "generation working set",
                p.batch_size * (3 * d.vocab * 4 + PROMPT_TOKENS * (2 * d.hidden + 2 * d.intermediate) * size),
                "float32 scores of the next token, one layer of the prompt's forward",
            ),
        ],
        note=f"each of {_ranks(config)} ranks holds a copy" if _ranks(config) > 1 else "",
    )


def sft_plan(config: TASConfig, dims_of: DimsOf) -> StagePlan:
    sft = config.train.sft
    a = dims_of(config.assistant.model.name, "assistant.model.name")
    lora = sft.peft.lora
    tokens = sft.per_device_train_batch_size * sft.tokenizer.max_length
    mixed = sft.bfloat16 or sft.fp16
    adapters = lora_params(a, lora.r, lora.target_modules)
    copies = _saved_copies(a, lora.modules_to_save)
    quantized = config.assistant.quantization.load_in_4bit
    copy_bytes = 16 if quantized else (8 if config.assistant.model.bfloat16 else 16)
    terms = _assistant_weights(config, a, trainable_copies=True) + [
        Term("LoRA adapters + gradients + AdamW", adapters * 16, f"{_count(adapters)} × (4 + 4 + 8) B, r={lora.r}"),
    ]
    if copies:
        terms.append(
            Term(
                "modules_to_save copies + gradients + AdamW",
                copies * copy_bytes,
                f"{_count(copies)} × {copy_bytes} B (train.sft.peft.lora.modules_to_save)",
            )
        )
    terms += _ddp_buckets(config, adapters + copies)
    terms += [
        Term(
            "activations (checkpointed)",
            tokens * a.layers * a.hidden * 4 + tokens * activation_bytes(a, mixed),
            f"{tokens} tokens × {a.layers} layer inputs + one layer recomputed in backward",
        ),
        Term(
            "loss (TRL's fused lm head)",
            min(tokens, SFT_LOSS_TILE[0]) * min(a.vocab, SFT_LOSS_TILE[1]) * 2 * 2 + a.vocab * a.hidden * 4,
            f"a [{SFT_LOSS_TILE[0]} × {SFT_LOSS_TILE[1]}] tile of 16-bit logits and its gradient, the float32 "
            "lm-head gradient",
        ),
    ]
    return StagePlan(
        "sft", terms, note=f"{sft.per_device_train_batch_size} × {sft.tokenizer.max_length} tokens per rank"
    )


def distill_plan(config: TASConfig, dims_of: DimsOf) -> StagePlan:
    kd = config.train.distillation
    s = student_dims(config, dims_of)
    a = dims_of(config.assistant.model.name, "assistant.model.name")
    length = min(kd.max_length, config.student.max_position_embeddings)
    tokens = kd.per_device_train_batch_size * length
    mixed = kd.bf16
    checkpointing = kd.gradient_checkpointing
    shards = _ranks(config) if _fsdp(config) else 1
    split = f" ÷ {shards} ranks (FSDP)" if shards > 1 else ""
    if kd.peft is not None:
        trainable = lora_params(s, kd.peft.lora.r, kd.peft.lora.target_modules)
        trainable += _saved_copies(s, kd.peft.lora.modules_to_save)
    else:
        trainable = s.params
    per_layer = activation_bytes(s, mixed)
    if checkpointing:
        kept = tokens * s.layers * s.hidden * 4
        how = f"{tokens} tokens × {s.layers} layer inputs × {s.hidden} × 4 B (the rest is recomputed in backward)"
    else:
        kept = tokens * s.layers * per_layer
        how = (
            f"{tokens} tokens × {s.layers} layers × {per_layer / 1024:.0f} KiB "
            "(train.distillation.gradient_checkpointing: true keeps the layer inputs only)"
        )
    kept += tokens * s.hidden * 12  # the embedding output and the final norm's
    terms = [
        Term("student weights (float32)", s.params * 4 // shards, f"{_count(s.params)} parameters × 4 B{split}"),
        Term("student gradients", trainable * 4 // shards, f"{_count(trainable)} trainable × 4 B{split}"),
        Term("AdamW states", trainable * 8 // shards, f"{_count(trainable)} × 2 moments × 4 B{split}"),
    ]
    terms += _ddp_buckets(config, trainable)
    if mixed:
        copied = s.linear_params if not checkpointing else s.linear_params // s.layers
        terms.append(
            Term(
                "bf16 weight copies (autocast)",
                copied * 2,
                "every layer's, kept for backward" if not checkpointing else "one layer's at a time",
            )
        )
    terms.append(Term("student activations" + (" (checkpointed)" if checkpointing else ""), kept, how))
    note = f"{kd.per_device_train_batch_size} × {length} tokens per rank"
    cache = kd.knowledgedistillation.teacher_cache
    if cache.mode == "off":
        terms += _assistant_weights(config, a, trainable_copies=False)
        copies = _saved_copies(a, config.train.sft.peft.lora.modules_to_save)
        adapters = lora_params(a, config.train.sft.peft.lora.r, config.train.sft.peft.lora.target_modules)
        if copies or adapters:
            terms.append(
                Term("assistant's SFT adapter", copies * 2 + adapters * 4, "LoRA (float32) and modules_to_save copies")
            )
    else:
        width = cache.k if cache.mode == "topk" else cache.samples
        terms.append(
            Term(
                "cached teacher rows of a batch",
                tokens * width * 12,
                f"{tokens} tokens × {width} ids, log-probs and weights × 4 B (no assistant weights or forward)",
            )
        )
        note += "; " + _cache_note(cache.mode, width)
    terms.append(_kd_working_set(config, s, a, tokens, mixed))
    return StagePlan("distill", terms, note=note)


def _cache_note(mode: str, width: int) -> str:
    """The teacher cache's size on disk (and in host RAM while distill trains), per answer token: `width`
    int32 ids and float32 log-probs (+ int32 counts when sampled) and a float32 mass (engine/train/teacher_cache.py)."""
    per_token = width * (12 if mode == "sampled" else 8) + 4
    return (
        f"the assistant is not loaded to train (teacher_cache.mode {mode}); its cache holds {per_token} B per answer "
        f"token on disk and in host RAM ({gib(per_token * 1e6)} per million answer tokens), made by one pass of "
        "the assistant alone before training"
    )


def _kd_working_set(config: TASConfig, s: ModelDims, a: ModelDims, tokens: int, mixed: bool) -> Term:
    """The largest of what a KD step holds for a while on top of the kept activations: they come one after
    another (the teacher's forward, then the loss chunk by chunk, then each checkpointed layer's recompute),
    so only the largest adds to the peak."""
    kd = config.train.distillation
    t_size = 2 if config.assistant.model.bfloat16 or config.assistant.quantization.load_in_4bit else 4
    chunk = min(kd.loss_chunk_size, tokens)
    if kd.knowledgedistillation.teacher_cache.mode != "off":  # no teacher hidden states, head or forward
        return Term(
            "KD loss chunk",
            tokens * s.hidden * 4
            + s.vocab * s.hidden * (4 + (2 if mixed else 0))
            + chunk * s.vocab * 4 * CHUNK_TENSORS,
            f"{chunk} positions (train.distillation.loss_chunk_size) × {s.vocab} × 4 B × {CHUNK_TENSORS}, the "
            "gathered hidden states, one more lm-head gradient",
        )
    candidates = [
        Term(
            "KD loss chunk",
            tokens * (s.hidden * 4 + a.hidden * t_size * 2)
            + s.vocab * s.hidden * (4 + (2 if mixed else 0))
            + chunk * s.vocab * 4 * CHUNK_TENSORS
            + (a.vocab * a.hidden * 4 if t_size == 2 else 0),
            f"{chunk} positions (train.distillation.loss_chunk_size) × {s.vocab} × 4 B × {CHUNK_TENSORS}, the "
            "gathered hidden states, one more lm-head gradient"
            + (", the assistant's lm head in float32 (its logits are computed in float32)" if t_size == 2 else ""),
        ),
        Term(
            "KD teacher's forward",
            tokens * (a.layers + 1) * a.hidden * t_size + tokens * (2 * a.hidden + 2 * a.intermediate) * t_size,
            f"the assistant's {a.layers + 1} hidden states of the batch and one layer's work",
        ),
    ]
    if kd.gradient_checkpointing:
        candidates.append(
            Term("one layer recomputed", tokens * activation_bytes(s, mixed), "in backward, with its gradients")
        )
    return max(candidates, key=lambda term: term.bytes)


def eval_plan(config: TASConfig, dims_of: DimsOf) -> StagePlan:
    """The fine-tuned assistant stays loaded while each other model is scored beside it, one at a time (the
    base assistant, the students, the open teacher for the code benchmark): the largest of them counts."""
    e = config.eval
    a = dims_of(config.assistant.model.name, "assistant.model.name")
    s = student_dims(config, dims_of)
    student_size = 2 if config.train.distillation.bf16 else 4
    # (label, dims, weight bytes, bytes per KV element)
    others = [(f"student ({'bf16' if student_size == 2 else 'float32'})", s, s.params * student_size, student_size)]
    if e.include_base_assistant:
        base = sum(t.bytes for t in _assistant_weights(config, a, trainable_copies=False))
        others.append((ASSISTANT_BASE.title, a, base, 2))
    if e.code.benchmark != "none" and e.code.include_teacher and config.teacher.source == "open":
        t = dims_of(config.teacher.open.model.name, "teacher.open.model.name")
        t_size = 2 if config.teacher.open.model.bfloat16 else 4
        others.append(("open teacher", t, t.params * t_size, t_size))
    label, big, weights, size = max(others, key=lambda other: other[2])
    length = min(config.train.distillation.max_length, config.student.max_position_embeddings)
    code_tokens = CODE_PROMPT_TOKENS + e.code.max_new_tokens
    code_kv = e.code.batch_size * code_tokens * big.kv_bytes_per_token * size // 2
    scoring = (
        e.batch_size * length * (big.layers + 1) * big.hidden * size
        + config.train.distillation.loss_chunk_size * big.vocab * 4 * 3
    )
    terms = _assistant_weights(config, a, trainable_copies=False) + [
        Term(f"{label} weights", weights, f"{_count(big.params)} parameters, the largest model scored beside it"),
    ]
    if e.code.benchmark != "none" and code_kv >= scoring:
        what = f"{e.code.batch_size} problems (eval.code.batch_size) × {code_tokens} tokens"
        terms.append(Term("code benchmark KV cache", code_kv, what))
    else:
        what = f"{e.batch_size} answers (eval.batch_size) × {length} tokens: hidden states, a loss chunk"
        terms.append(Term("scoring working set", scoring, what))
    return StagePlan("eval", terms)


PLANNERS: dict[str, Callable[[TASConfig, DimsOf], StagePlan]] = {
    "data": lambda config, dims_of: StagePlan("data", note="no GPU", gpu=False),
    "teacher": teacher_plan,
    "sft": sft_plan,
    "distill": distill_plan,
    "eval": eval_plan,
}


# ------------------------------------------------------------------------------------ fits, and fixes


@dataclass
class Verdict:
    """A stage's plan against one GPU's memory, and the edits (key, value) that would make it fit."""

    plan: StagePlan
    budget: int | None  # bytes one GPU offers the stage; None: no GPU known
    fixes: list[tuple[str, object]] = field(default_factory=list)
    problem: str = ""  # why it cannot run as configured, beyond memory (more ranks than GPUs)

    @property
    def fits(self) -> bool | None:
        if not self.plan.gpu:
            return True
        if self.budget is None:
            return None
        return not self.problem and self.plan.peak <= self.budget


def _batch_fix(config, planner, dims_of, budget, batch_key, accumulation_key=None) -> list[tuple[str, object]]:
    """The largest batch that fits, or nothing. With an accumulation key, a batch that divides the effective
    batch (batch × accumulation) is preferred, so that the effective batch, and the training, stay the same."""
    batch = get_key(config, batch_key)
    steps = get_key(config, accumulation_key) if accumulation_key else 1
    exact = (lambda b: (batch * steps) % b == 0) if accumulation_key else (lambda b: True)
    candidates = sorted(range(1, batch), key=lambda b: (not exact(b), -b))
    for smaller in candidates:
        trial = config.model_copy(deep=True)
        set_key(trial, batch_key, smaller)
        if planner(trial, dims_of).peak <= budget:
            fixes: list[tuple[str, object]] = [(batch_key, smaller)]
            if accumulation_key:
                fixes.append((accumulation_key, math.ceil(batch * steps / smaller)))
            return fixes
    return []


FIRST_FIXES: dict[str, list[tuple[str, Callable[[TASConfig], object]]]] = {
    # edits that cost time, not results, tried in order before a smaller batch
    "distill": [
        ("train.distillation.gradient_checkpointing", lambda c: True),
        ("train.distillation.loss_chunk_size", lambda c: min(256, c.train.distillation.loss_chunk_size)),
    ],
}
BATCH_KEYS = {
    "teacher": ("teacher.open.pipeline.batch_size", None),
    "sft": ("train.sft.per_device_train_batch_size", "train.sft.gradient_accumulation_steps"),
    "distill": ("train.distillation.per_device_train_batch_size", "train.distillation.gradient_accumulation_steps"),
    "eval": ("eval.code.batch_size", None),
}


def fixes_for(config: TASConfig, stage: str, dims_of: DimsOf, budget: int) -> list[tuple[str, object]]:
    """Edits, cheapest first, that bring `stage` under `budget`; [] when none does."""
    planner = PLANNERS[stage]
    trial = config.model_copy(deep=True)
    fixes: list[tuple[str, object]] = []
    for key, value_of in FIRST_FIXES.get(stage, []):
        value = value_of(trial)
        if get_key(trial, key) != value:
            set_key(trial, key, value)
            fixes.append((key, value))
            if planner(trial, dims_of).peak <= budget:
                return fixes
    if stage in BATCH_KEYS and not (stage == "teacher" and config.teacher.source != "open"):
        batch = _batch_fix(trial, planner, dims_of, budget, *BATCH_KEYS[stage])
        if batch:
            return fixes + batch
    return []


def plan(
    config: TASConfig, stages: list[str], gpu_memory: int | None, gpu_count: int | None, dims_of: DimsOf = load_dims
) -> list[Verdict]:
    """Each stage's plan against one GPU of `gpu_memory` bytes (None: no GPU known), with fixes when needed."""
    verdicts = []
    cached: dict[tuple[str, str], ModelDims] = {}

    def dims(name: str, key: str) -> ModelDims:
        if (name, key) not in cached:
            cached[(name, key)] = dims_of(name, key)
        return cached[(name, key)]

    for stage in stages:
        stage_plan = PLANNERS[stage](config, dims)
        budget = None if gpu_memory is None else gpu_memory - CUDA_RESERVE
        verdict = Verdict(stage_plan, budget)
        ranks = _ranks(config)
        if stage_plan.gpu and gpu_count is not None and stage in ("teacher", "sft", "distill") and ranks > gpu_count:
            verdict.problem = f"launch.nproc_per_node is {ranks} but this node has {gpu_count} GPUs"
            verdict.fixes = [("launch.nproc_per_node", gpu_count)]
        elif verdict.fits is False:
            verdict.fixes = fixes_for(config, stage, dims, budget)
        verdicts.append(verdict)
    return verdicts
