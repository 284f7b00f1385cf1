"""The distillation loss of the student stage: (1 - w)·CE + w·T²·D(teacher_T, student_T).

Heavy module (torch): import it only in worker processes and tests.

What is computed, per *response token* (a position whose next-token label is not -100):

* CE  = -log q(label)                               the student's softmax at temperature 1;
* D   = a divergence between p = the teacher's and q = the student's softmax, both at temperature T
        (`train.distillation.knowledgedistillation.loss.divergence`), sums over the vocabulary v:
    forward_kl  KL(p ‖ q) = Σ p·(log p - log q)            the default, and the original TAS loss: mass-covering;
    reverse_kl  KL(q ‖ p) = Σ q·(log q - log p)            mode-seeking (on-policy distillation's choice);
    jsd         β·KL(p ‖ m) + (1 - β)·KL(q ‖ m),  m = β·p + (1 - β)·q
                the generalized JSD of GKD (Agarwal et al., 2024) exactly as TRL's `generalized_jsd_loss`:
                `beta` = 0 is forward KL and 1 reverse KL themselves (the formula alone would give 0 there);
    skew_kl     KL(p ‖ m),  m = α·p + (1 - α)·q            DistiLLM's skew KL (`alpha`; 0: forward KL, 1: 0),
                finite even where the student gives a token ~0 probability;
    tvd         ½·Σ |p - q|                                 total variation (DistillKit), always in [0, 1];
* loss = (1 - w)·CE + w·T²·D                        T² keeps the KD gradient on the same scale as CE's
                                                    when T changes (Hinton et al., 2015); applied to every
                                                    divergence, so `weight` means the same for each.

Only response tokens count. The original TAS loss ran the KL over every position of the padded batch,
prompt and padding included, so a batch's loss depended on how much padding it happened to have and the
student was taught to copy the teacher on the *prompt*, which it never has to generate. Here positions
labelled -100 (the prompt and the padding, as the SFT/KD collators mark them) contribute nothing at all:
neither to the sums nor to the normaliser.

Reductions (`train.distillation.knowledgedistillation.loss.reduction`):

* "batchmean" and "mean": both sums divided by the number of response tokens N. For token-level KD each
  response token is one row (one distribution), so this is what `F.kl_div(..., "batchmean")` means when
  its input is the (N, V) matrix of those rows. (`F.kl_div`'s own "mean" would also divide by the vocab
  size, making the KD term ~150,000x too small at Qwen's vocab; that is never what one wants, so "mean"
  here is the per-token mean too.)
* "sum": the plain sums over response tokens.

A batch with no response token at all (every label -100, e.g. every response truncated away) gives a
loss of 0 that is still attached to the graph (so backward works and every parameter gets a zero
gradient, which keeps DDP happy) and `tokens == 0`: one odd batch should not kill a multi-hour run, and
the caller sees `tokens` if it wants to react.

Vocabulary: the two models may have different *padded* vocab sizes (Qwen2.5 pads its embedding matrix
past its 151,665 tokens to 151,936 rows up to 3B and to 152,064 from 7B). `vocab_size=V` names the columns
real tokens use, the tokenizer's (see `engine.train.student.check_vocab_compatibility`); each model keeps
its own size and nothing is resized. The teacher's distribution is taken over its first V columns only:
its columns past V are padding no token maps to, so whatever it computes there is ignored (probability 0).
The student keeps its softmax over *all* of its columns (its real output distribution, the one it samples
from) and the KL reads it on the first V, so the KL is the exact KL between the padding-free teacher and
the student: any mass the student puts on its padding columns is mass missing from real tokens, and is
trained away. CE is the student's real CE. With V equal to both sizes nothing is cropped. For every
divergence the same holds: each is the exact divergence between the teacher with probability 0 on the
student's padding columns and the student's full softmax (jsd's and tvd's padding terms are computed in
closed form from the student's padding mass), except reverse_kl (and jsd at β = 1): Σ q·log(q/p) is
infinite as soon as the student puts any mass where the teacher has none, so reverse KL compares the teacher
with the student's softmax over the first V columns alone (renormalised), and leaves the padding mass to CE.

Three entry points:

* `kd_loss_reference` - the direct computation on full (B, S, V) logits: every position goes through
  a full softmax and is then masked. Clear, and the oracle of the tests, but it holds several B·S·V
  float32 tensors (gigabytes at V = 151,936), so it is also the "naive" variant of the memory bench.
* `chunked_kd_loss` - the memory-lean path, from the last hidden states and the lm-head weights: only the
  response positions are gathered (N x H, small), and logits exist for one chunk of positions at a time;
  each chunk runs under activation checkpointing, so backward recomputes a chunk's logits instead of
  keeping every chunk's. The student's logits for the whole batch never exist.
* `chunked_kd_loss_from_logits` - the same chunking when the caller already has the full logits (a plain
  `model(...).logits`); it saves the softmax temporaries, but the logits themselves still dominate memory.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
"""The label of a position that must not be learned (prompt, padding): the Hugging Face convention."""

REDUCTIONS = ("batchmean", "mean", "sum")

DEFAULT_CHUNK_SIZE = 256
"""Response positions per chunk. At V = 151,936 one float32 chunk of logits is 256·V·4 B ≈ 156 MB, and a
chunk holds a handful of such tensors at once (logits, log-probs of both models, the KL terms); jsd and
skew_kl hold about twice as many (the mixture's log-probs, a second term)."""

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")


@dataclass(frozen=True)
class Divergence:
    """What the KD term measures (`knowledgedistillation.loss.divergence`), with jsd's `beta` and skew_kl's
    `alpha` (each read only by its own divergence). The default is forward KL, the original TAS loss."""

    name: str = "forward_kl"
    beta: float = 0.5
    alpha: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in DIVERGENCES:
            raise ValueError(f"knowledgedistillation.loss.divergence must be one of {DIVERGENCES}, got {self.name!r}")
        for key in ("beta", "alpha"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"knowledgedistillation.loss.{key} must be in [0, 1], got {getattr(self, key)}")

    @property
    def effective(self) -> str:
        """The formula that runs: jsd at β = 0 / 1 is forward / reverse KL (TRL's convention), and skew_kl at
        α = 0 is forward KL (its mixture is the student itself)."""
        if self.name == "jsd" and self.beta in (0.0, 1.0):
            return "forward_kl" if self.beta == 0.0 else "reverse_kl"
        if self.name == "skew_kl" and self.alpha == 0.0:
            return "forward_kl"
        return self.name


FORWARD_KL = Divergence()


@dataclass
class KDLossOutput:
    """The loss and its parts, all reduced the same way, so `loss == (1 - w)·ce_loss + w·kd_loss`.

    `kd_loss` already includes the T² factor. With `weight == 0` the teacher is not run and `kd_loss` is a
    zero tensor. `tokens` is the number of response positions the loss was taken over.
    """

    loss: Tensor
    ce_loss: Tensor
    kd_loss: Tensor
    tokens: int

    def metrics(self) -> dict[str, float]:
        """Plain floats for logging."""
        return {
            "loss": float(self.loss.detach()),
            "ce_loss": float(self.ce_loss.detach()),
            "kd_loss": float(self.kd_loss.detach()),
            "tokens": float(self.tokens),
        }


# ----------------------------------------------------------------------------------- the causal shift


def next_token_targets(labels: Tensor) -> Tensor:
    """The causal shift, done here and nowhere else: the logits at position t predict the label at t + 1.

    Returns `targets` with the same (B, S) shape as `labels`, aligned with the logits / hidden states:
    `targets[b, t] = labels[b, t + 1]`, and the last position, which predicts nothing, gets -100. Every
    function below indexes logits and hidden states with `targets`, never with `labels`.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (batch, seq), got shape {tuple(labels.shape)}")
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def response_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of the (B·S, ...) flattened logits / hidden states that have a target, and those targets."""
    targets = next_token_targets(labels).reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return rows, targets.index_select(0, rows)


# ---------------------------------------------------------------------------------------- arguments


def _check_args(weight: float, temperature: float, reduction: str, chunk_size: int | None = None) -> None:
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"knowledgedistillation.weight must be in [0, 1], got {weight}")
    if not temperature > 0:
        raise ValueError(f"knowledgedistillation.loss.temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"knowledgedistillation.loss.reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")


def _check_positions(student: Tensor, teacher: Tensor | None, labels: Tensor, what: str) -> None:
    if student.dim() != 3 or student.shape[:2] != labels.shape:
        raise ValueError(
            f"student {what} must be (batch, seq, ·) matching labels {tuple(labels.shape)}, got {tuple(student.shape)}"
        )
    if teacher is not None and (teacher.dim() != 3 or teacher.shape[:2] != labels.shape):
        raise ValueError(
            f"teacher {what} must be (batch, seq, ·) matching labels {tuple(labels.shape)}, "
            f"got {tuple(teacher.shape)} (do teacher and student see the same tokens?)"
        )


def shared_vocab(student_vocab: int, teacher_vocab: int, vocab_size: int | None) -> int:
    """The number of leading columns KD compares: `vocab_size` (the tokenizer's), or the common size when equal."""
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"student and teacher vocab sizes differ ({student_vocab} vs {teacher_vocab}); pass vocab_size "
                "(the shared size from engine.train.student.check_vocab_compatibility)"
            )
        return student_vocab
    if not 0 < vocab_size <= min(student_vocab, teacher_vocab):
        raise ValueError(
            f"vocab_size={vocab_size} must be in 1..{min(student_vocab, teacher_vocab)} "
            f"(student {student_vocab}, teacher {teacher_vocab} columns)"
        )
    return vocab_size


def _as_float(x: Tensor) -> Tensor:
    """Softmaxes in at least float32: bf16 log-probs over 150k columns are too coarse for a KL."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def teacher_logits(hidden: Tensor, head: Tensor) -> Tensor:
    """The frozen teacher's logits in float32, from its hidden states and lm-head weight.

    A bf16 or 4-bit teacher hands both over in bf16, and a bf16 matmul rounds every logit to 8 bits of
    mantissa (steps of 0.06 at 10, 0.125 at 20): noise in the very distribution the student is taught.
    The float32 copies are no-grad temporaries of one chunk (the head's is V x H x 4 bytes), and autocast
    is off so the product stays float32 under bf16 training too.
    """
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        return _as_float(hidden) @ _as_float(head).T


# ------------------------------------------------------------------------------------- the two sums


def _divergence_terms(z_s: Tensor, z_t: Tensor, temperature: float, divergence: Divergence):
    """The divergence of each row (the last dimension is the vocabulary) as `terms.sum(-1) + extra`.

    z_s (..., V_s) float student logits, z_t (..., V) teacher logits already cropped to the shared V.
    `terms` (..., V) are the per-column terms over the shared columns; `extra` (...) the closed-form term of
    the student's padding columns (past V, where the teacher's probability is 0), or None when it is 0.
    F.kl_div(input=log a, target=b) is Σ b·(log b - log a) with 0·log 0 = 0, differentiable in both.
    """
    vocab = z_t.shape[-1]
    name = divergence.effective
    with torch.no_grad():
        z_t = _as_float(z_t) / temperature
        p = F.softmax(z_t, dim=-1)
    if name == "reverse_kl":  # over the first V columns, renormalised (module docstring)
        log_q = F.log_softmax(z_s[..., :vocab] / temperature, dim=-1)
        with torch.no_grad():
            log_p = F.log_softmax(z_t, dim=-1)
        return F.kl_div(log_p, log_q, reduction="none", log_target=True), None
    log_q_all = F.log_softmax(z_s / temperature, dim=-1)
    log_q = log_q_all[..., :vocab]
    if name == "forward_kl":
        return F.kl_div(log_q, p, reduction="none"), None
    pad_mass = torch.logsumexp(log_q_all[..., vocab:], dim=-1).exp()  # 0 when nothing is cropped
    if name == "tvd":
        return 0.5 * (p - log_q.exp()).abs(), 0.5 * pad_mass
    with torch.no_grad():
        log_p = F.log_softmax(z_t, dim=-1)
    share = divergence.beta if name == "jsd" else divergence.alpha  # the teacher's share of the mixture m
    log_m = torch.logaddexp(log_p + math.log(share), log_q + math.log1p(-share)) if share < 1 else log_p
    if name == "skew_kl":
        return F.kl_div(log_m, p, reduction="none"), None
    # jsd; on a padding column m = (1 - β)·q, so KL(q ‖ m) gains q·log(1 / (1 - β)) there
    terms = share * F.kl_div(log_m, p, reduction="none") + (1 - share) * F.kl_div(
        log_m, log_q, reduction="none", log_target=True
    )
    return terms, -(1 - share) * math.log1p(-share) * pad_mass


def _chunk_sums(
    student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, temperature: float, divergence: Divergence
):
    """(Σ CE, Σ D) over a set of rows: student_logits (n, V_s), teacher_logits (n, V) or None, targets (n,).

    The teacher's logits arrive already cropped to the shared V columns; the student's log-probs are
    normalised over all V_s of its columns and then read on the shared V (see the module docstring).
    """
    z_s = _as_float(student_logits)
    ce_sum = F.cross_entropy(z_s, targets, reduction="sum")
    if teacher_logits is None:
        return ce_sum, z_s.new_zeros(())
    terms, extra = _divergence_terms(z_s, teacher_logits, temperature, divergence)
    kd_sum = terms.sum()
    return ce_sum, kd_sum if extra is None else kd_sum + extra.sum()


def _combine(ce_sum, kl_sum, tokens, weight, temperature, reduction) -> KDLossOutput:
    """Normalise the two sums and weight them: the one place the reduction and T² are applied."""
    norm = tokens if reduction in ("batchmean", "mean") else 1
    ce_loss = ce_sum / norm
    kd_loss = (temperature**2) * kl_sum / norm
    loss = (1.0 - weight) * ce_loss + weight * kd_loss
    return KDLossOutput(loss=loss, ce_loss=ce_loss, kd_loss=kd_loss, tokens=tokens)


def _no_tokens(*graph: Tensor | None) -> KDLossOutput:
    """The all-masked batch: loss 0, but attached to the inputs' graph so backward still runs."""
    attached = [t for t in graph if t is not None and t.requires_grad]
    ref = next(t for t in graph if t is not None)
    zero = ref.new_zeros((), dtype=torch.float32)
    for t in attached:
        zero = zero + t.reshape(-1)[:1].float().sum() * 0.0
    return KDLossOutput(loss=zero, ce_loss=zero.detach(), kd_loss=zero.detach(), tokens=0)


# ---------------------------------------------------------------------------------------- reference


def kd_loss_reference(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    weight: float,
    temperature: float,
    reduction: str = "batchmean",
    vocab_size: int | None = None,
    divergence: Divergence = FORWARD_KL,
) -> KDLossOutput:
    """The loss computed directly on full logits: every position gets a full softmax, then is masked.

    student_logits (B, S, V_s), teacher_logits (B, S, V_t) (ignored, may be None, when weight == 0),
    labels (B, S) with -100 on prompt and padding. Memory: several (B, S, V) float32 tensors.
    """
    _check_args(weight, temperature, reduction)
    use_teacher = weight > 0
    _check_positions(student_logits, teacher_logits if use_teacher else None, labels, "logits")
    targets = next_token_targets(labels)
    mask = targets != IGNORE_INDEX
    tokens = int(mask.sum())
    if tokens == 0:
        return _no_tokens(student_logits)

    z_s = _as_float(student_logits)
    ce_per_position = F.cross_entropy(
        z_s.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )  # 0 where the target is -100
    ce_sum = ce_per_position.sum()

    kl_sum = z_s.new_zeros(())
    if use_teacher:
        vocab = shared_vocab(z_s.shape[-1], teacher_logits.shape[-1], vocab_size)
        terms, extra = _divergence_terms(z_s, teacher_logits[..., :vocab], temperature, divergence)
        per_position = terms.sum(-1) if extra is None else terms.sum(-1) + extra  # (B, S)
        kl_sum = torch.where(mask, per_position, 0.0).sum()
    return _combine(ce_sum, kl_sum, tokens, weight, temperature, reduction)


# ------------------------------------------------------------------------------------ chunked paths


def _needs_checkpoint(*tensors: Tensor) -> bool:
    """Checkpointing only pays when a backward will run; in eval (no grad) a chunk is simply freed."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _sum_over_chunks(chunk_sums, chunks, checkpointed: bool) -> tuple[Tensor, Tensor]:
    """(Σ CE, Σ KL) of `chunk_sums(*chunk)` over the chunks, in order; each chunk under activation
    checkpointing when `checkpointed`, so backward recomputes its logits instead of keeping them."""
    ce_sum = kl_sum = None
    for args in chunks:
        ce, kl = checkpoint(chunk_sums, *args, use_reentrant=False) if checkpointed else chunk_sums(*args)
        ce_sum = ce if ce_sum is None else ce_sum + ce
        kl_sum = kl if kl_sum is None else kl_sum + kl
    return ce_sum, kl_sum


def _checked_rows(student, teacher, labels, weight, temperature, reduction, chunk_size, what) -> tuple[Tensor, Tensor]:
    """The argument checks both chunked paths start with, then `response_positions(labels)`.

    `teacher` is the teacher's input when it will be used (weight > 0), else None.
    """
    _check_args(weight, temperature, reduction, chunk_size)
    _check_positions(student, teacher, labels, what)
    return response_positions(labels)


def chunked_kd_loss(
    student_hidden: Tensor,
    student_lm_head_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_lm_head_weight: Tensor | None,
    labels: Tensor,
    weight: float,
    temperature: float,
    reduction: str = "batchmean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
    divergence: Divergence = FORWARD_KL,
) -> KDLossOutput:
    """The loss from last hidden states and lm-head weights, never holding more than a chunk of logits.

    student_hidden (B, S, H_s) and student_lm_head_weight (V_s, H_s): the student's final-norm output and
    its `lm_head.weight` (logits = hidden @ W.T; Qwen2's lm head has no bias). The teacher's likewise,
    (B, S, H_t) and (V_t, H_t), run under no_grad; both may be None when weight == 0 (CE-only control:
    the teacher is never touched).

    Steps: gather the N response positions (N x H, cheap); split them into chunks of `chunk_size`;
    for each chunk compute the logits, the CE and KL sums, under `torch.utils.checkpoint` so backward
    recomputes that chunk's logits (and the teacher's, one more matmul) instead of keeping all of them.
    Peak memory: the lm-head gradient, one more lm-head-sized gradient while a chunk's backward adds its
    share, and one chunk's (chunk_size, V) float32 temporaries (with a bf16 teacher, also a float32 copy of
    its head while the chunk's teacher logits are computed: `teacher_logits`). The price is time: every chunk's student
    and teacher matmuls run twice (bench/kd_loss_memory.py: 4.2x less memory, 1.8x the time on CPU, at
    B=2, S=1024, V=151,936).
    """
    use_teacher = weight > 0
    if use_teacher and (teacher_hidden is None or teacher_lm_head_weight is None):
        raise ValueError("weight > 0 needs the teacher's hidden states and lm-head weight")
    teacher = teacher_hidden if use_teacher else None
    rows, targets = _checked_rows(
        student_hidden, teacher, labels, weight, temperature, reduction, chunk_size, "hidden states"
    )
    tokens = int(rows.numel())
    if tokens == 0:
        return _no_tokens(student_hidden, student_lm_head_weight)

    h_student = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, rows)
    w_student = student_lm_head_weight
    if use_teacher:
        vocab = shared_vocab(w_student.shape[0], teacher_lm_head_weight.shape[0], vocab_size)
        h_teacher = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, rows)
        w_teacher = teacher_lm_head_weight.detach()[:vocab]  # a view: the first V rows
    checkpointed = _needs_checkpoint(h_student, w_student)

    def chunk_sums(h_s: Tensor, w_s: Tensor, h_t: Tensor | None, w_t: Tensor | None, y: Tensor):
        z_t = teacher_logits(h_t, w_t) if h_t is not None else None
        return _chunk_sums(h_s @ w_s.T, z_t, y, temperature, divergence)

    # split(), not slicing: backward then concatenates the chunks' gradients once, instead of each
    # slice's backward allocating a zero gradient the size of the whole input.
    chunks = zip(
        h_student.split(chunk_size),
        h_teacher.split(chunk_size) if use_teacher else itertools.repeat(None),
        targets.split(chunk_size),
    )
    teacher_weight = w_teacher if use_teacher else None
    args = ((h_s, w_student, h_t, teacher_weight, y) for h_s, h_t, y in chunks)
    ce_sum, kl_sum = _sum_over_chunks(chunk_sums, args, checkpointed)
    return _combine(ce_sum, kl_sum, tokens, weight, temperature, reduction)


def chunked_kd_loss_from_logits(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    weight: float,
    temperature: float,
    reduction: str = "batchmean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
    divergence: Divergence = FORWARD_KL,
) -> KDLossOutput:
    """The same loss when the caller already has full logits (B, S, V_s) and (B, S, V_t).

    The student's response rows are gathered once (one (N, V_s) copy: gathering per chunk would make
    backward allocate a full-size zero gradient per chunk); the teacher's rows are read per chunk under
    no_grad. Each chunk's softmaxes are checkpointed, so only the logits themselves are kept for backward.
    """
    use_teacher = weight > 0
    if use_teacher and teacher_logits is None:
        raise ValueError("weight > 0 needs the teacher's logits")
    teacher = teacher_logits if use_teacher else None
    rows, targets = _checked_rows(student_logits, teacher, labels, weight, temperature, reduction, chunk_size, "logits")
    tokens = int(rows.numel())
    if tokens == 0:
        return _no_tokens(student_logits)

    z_student = student_logits.reshape(-1, student_logits.shape[-1]).index_select(0, rows)
    if use_teacher:
        vocab = shared_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
        teacher_rows = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    checkpointed = _needs_checkpoint(z_student)

    def chunk_sums(z_s: Tensor, y: Tensor, row_ids: Tensor):
        z_t = None
        if use_teacher:
            with torch.no_grad():
                z_t = teacher_rows.index_select(0, row_ids)[:, :vocab]
        return _chunk_sums(z_s, z_t, y, temperature, divergence)

    chunks = zip(z_student.split(chunk_size), targets.split(chunk_size), rows.split(chunk_size))
    ce_sum, kl_sum = _sum_over_chunks(chunk_sums, chunks, checkpointed)
    return _combine(ce_sum, kl_sum, tokens, weight, temperature, reduction)


# ------------------------------------------------------------------------------------ cached teacher


def sparse_kd_loss(
    student_hidden: Tensor,
    student_lm_head_weight: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    teacher_weights: Tensor,
    labels: Tensor,
    weight: float,
    temperature: float,
    reduction: str = "batchmean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> KDLossOutput:
    """The forward-KL loss against a *sparse* teacher: a few (token id, log-prob, weight) per response token.

    What a cached teacher gives (engine/train/teacher_cache.py). teacher_ids, teacher_logprobs and
    teacher_weights are (N, k), one row per response token in `response_positions(labels)` order; a slot
    with weight 0 is padding. Per response token the KD term is

        Σ_j w_j · (log p_j - log q_T(id_j))       q_T: the student's softmax at T over all its columns

    and CE, reductions, T² and chunking are `chunked_kd_loss`'s. The two cache modes fill the slots so:

    * top-k: the teacher's k most likely tokens at T, renormalised to their mass m: log p_j = log p_T(id_j)
      - log m and w_j = p_j. This is the exact KL to the teacher *truncated* to its top k, not to the
      teacher: the tail (1 - m) is dropped and the kept mass scaled up by 1/m, so the student is pulled
      toward a sharper distribution than the teacher's (a bias that grows as m falls; the cache logs the
      mean m). With k = V (m = 1) it equals the dense forward KL.
    * sampled (Sparse Logit Sampling, Anshumann et al., ACL 2025): S tokens drawn from p_T, each distinct
      token once with w_j = count_j / S and log p_j = log p_T(id_j) unnormalised. E[count_j / S] = p_T(id_j),
      so the term and its gradient are unbiased estimates of the dense forward KL's; the variance falls as 1/S.
    """
    _check_args(weight, temperature, reduction, chunk_size)
    _check_positions(student_hidden, None, labels, "hidden states")
    rows, targets = response_positions(labels)
    tokens = int(rows.numel())
    if weight > 0 and teacher_ids.shape[0] != tokens:
        raise ValueError(
            f"the cached teacher has {teacher_ids.shape[0]} rows for {tokens} response tokens: the cache was "
            "made for other data"
        )
    if tokens == 0:
        return _no_tokens(student_hidden, student_lm_head_weight)
    h_student = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, rows)
    w_student = student_lm_head_weight

    def chunk_sums(h_s: Tensor, w_s: Tensor, y: Tensor, ids: Tensor | None, lp: Tensor | None, w: Tensor | None):
        z_s = _as_float(h_s @ w_s.T)
        ce_sum = F.cross_entropy(z_s, y, reduction="sum")
        if ids is None:
            return ce_sum, z_s.new_zeros(())
        log_q = F.log_softmax(z_s / temperature, dim=-1).gather(1, ids.long())
        return ce_sum, (_as_float(w) * (_as_float(lp) - log_q)).sum()

    if weight > 0:
        teacher = zip(
            teacher_ids.split(chunk_size), teacher_logprobs.split(chunk_size), teacher_weights.split(chunk_size)
        )
    else:
        teacher = itertools.repeat((None, None, None))
    args = (
        (h_s, w_student, y, *t) for h_s, y, t in zip(h_student.split(chunk_size), targets.split(chunk_size), teacher)
    )
    ce_sum, kl_sum = _sum_over_chunks(chunk_sums, args, _needs_checkpoint(h_student, w_student))
    return _combine(ce_sum, kl_sum, tokens, weight, temperature, reduction)
