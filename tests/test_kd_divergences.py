"""The KD divergences (`knowledgedistillation.loss.divergence`): each chunked path equals the reference, the
reference equals the divergence written directly with torch.distributions, the limits hold, and two gloo
ranks give the loss and gradient of one."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributions import Categorical, kl_divergence

from engine.train.kd_loss import (
    DIVERGENCES,
    IGNORE_INDEX,
    Divergence,
    chunked_kd_loss,
    chunked_kd_loss_from_logits,
    kd_loss_reference,
    next_token_targets,
)

from .test_kd_loss import V, grads, make_batch

# every divergence, jsd and skew_kl at a parameter inside (0, 1)
CASES = [Divergence(name, beta=0.3, alpha=0.2) for name in DIVERGENCES]
IDS = [d.name for d in CASES]


@pytest.mark.parametrize("divergence", CASES, ids=IDS)
@pytest.mark.parametrize("crop", [False, True], ids=["same-vocab", "cropped"])
def test_chunked_paths_equal_the_reference(divergence: Divergence, crop: bool):
    pads = (3, 7) if crop else (0, 0)
    h_s, w_s, h_t, w_t, labels = make_batch(vocab_s=V + pads[0], vocab_t=V + pads[1])
    kw = dict(weight=0.4, temperature=1.7, vocab_size=V, divergence=divergence)
    ref = kd_loss_reference(h_s @ w_s.T, h_t @ w_t.T, labels, **kw)
    hidden = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, chunk_size=4, **kw)
    for got, want in zip(grads(hidden, h_s, w_s), grads(ref, h_s, w_s)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-8)

    logits = (h_s @ w_s.T).detach().requires_grad_()
    ref_l = kd_loss_reference(logits, h_t @ w_t.T, labels, **kw)
    from_logits = chunked_kd_loss_from_logits(logits, h_t @ w_t.T, labels, chunk_size=3, **kw)
    torch.testing.assert_close(grads(from_logits, logits)[0], grads(ref_l, logits)[0], rtol=0, atol=1e-8)
    for out in (hidden, from_logits):
        for name in ("loss", "ce_loss", "kd_loss"):
            torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=1e-8)
    assert ref.kd_loss.item() > 0


def direct(divergence: Divergence, s_row: torch.Tensor, t_row: torch.Tensor, temp: float) -> torch.Tensor:
    """One position's divergence from its definition: the teacher's first V columns, 0 past them; the
    student's whole softmax (reverse KL: its first V columns, renormalised: kd_loss's module docstring)."""
    p_shared = torch.softmax(t_row[:V] / temp, -1)
    p = torch.cat([p_shared, p_shared.new_zeros(s_row.numel() - V)])
    q = torch.softmax(s_row / temp, -1)
    b, a = divergence.beta, divergence.alpha
    kl = {
        "forward_kl": lambda: kl_divergence(Categorical(probs=p), Categorical(probs=q)),
        "reverse_kl": lambda: kl_divergence(
            Categorical(probs=torch.softmax(s_row[:V] / temp, -1)), Categorical(probs=p_shared)
        ),
        "jsd": lambda: (
            b * kl_divergence(Categorical(probs=p), Categorical(probs=b * p + (1 - b) * q))
            + (1 - b) * kl_divergence(Categorical(probs=q), Categorical(probs=b * p + (1 - b) * q))
        ),
        "skew_kl": lambda: kl_divergence(Categorical(probs=p), Categorical(probs=a * p + (1 - a) * q)),
        "tvd": lambda: 0.5 * (p - q).abs().sum(),
    }
    return kl[divergence.name]()


@pytest.mark.parametrize("divergence", CASES, ids=IDS)
def test_reference_is_the_divergence_of_its_definition(divergence: Divergence):
    """With a cropped vocabulary, so the padding columns' closed-form terms are checked too."""
    h_s, w_s, h_t, w_t, labels = make_batch(vocab_s=V + 3, vocab_t=V + 7)
    s, t = (h_s @ w_s.T).detach(), h_t @ w_t.T
    temp = 1.7
    mask = next_token_targets(labels) != IGNORE_INDEX
    expected = torch.stack([direct(divergence, sr, tr, temp) for sr, tr in zip(s[mask], t[mask])]).mean()
    out = kd_loss_reference(s, t, labels, weight=1.0, temperature=temp, vocab_size=V, divergence=divergence)
    torch.testing.assert_close(out.kd_loss, temp**2 * expected, rtol=1e-10, atol=1e-12)


def test_limits_of_the_parameters():
    h_s, w_s, h_t, w_t, labels = make_batch(vocab_s=V + 3, vocab_t=V + 7)
    s, t = h_s @ w_s.T, h_t @ w_t.T

    def kd(name, **param):
        return kd_loss_reference(s, t, labels, 1.0, 2.0, vocab_size=V, divergence=Divergence(name, **param)).kd_loss

    # TRL's convention: jsd at beta 0 is forward KL, at beta 1 reverse KL
    assert torch.equal(kd("jsd", beta=0.0), kd("forward_kl"))
    assert torch.equal(kd("jsd", beta=1.0), kd("reverse_kl"))
    # skew KL: alpha 0 is forward KL, alpha 1 compares the teacher with itself
    assert torch.equal(kd("skew_kl", alpha=0.0), kd("forward_kl"))
    torch.testing.assert_close(kd("skew_kl", alpha=1e-9), kd("forward_kl"))
    assert abs(kd("skew_kl", alpha=1.0).item()) < 1e-12
    # skewing bounds the divergence by log(1 / alpha): finite where the student gives a token ~0
    assert 0 < kd("skew_kl", alpha=0.1).item() < 4 * torch.log(torch.tensor(10.0)).item()
    # the student equal to the teacher: every divergence is 0
    for name in DIVERGENCES:
        same = kd_loss_reference(t, t, labels, 1.0, 2.0, divergence=Divergence(name)).kd_loss
        assert abs(same.item()) < 1e-12, name


def test_tvd_is_bounded_by_one_per_token():
    """Far-apart distributions (logits x 40) push TVD toward 1, never past it; `sum` gives the token sum."""
    h_s, w_s, h_t, w_t, labels = make_batch(vocab_s=V + 3, vocab_t=V + 7)
    s, t = 40 * (h_s @ w_s.T), -40 * (h_t @ w_t.T)
    tvd = Divergence("tvd")
    out = kd_loss_reference(s, t, labels, 1.0, 1.0, "sum", vocab_size=V, divergence=tvd)
    assert 0.5 * out.tokens < out.kd_loss.item() <= out.tokens
    mean = kd_loss_reference(s, t, labels, 1.0, 1.0, vocab_size=V, divergence=tvd).kd_loss.item()
    assert 0.5 < mean <= 1.0


def test_bad_divergence_names_the_key():
    with pytest.raises(ValueError, match=r"loss\.divergence must be one of .*'tvd'.*got 'kl'"):
        Divergence("kl")
    with pytest.raises(ValueError, match=r"loss\.beta must be in \[0, 1\]"):
        Divergence("jsd", beta=1.5)
    with pytest.raises(ValueError, match=r"loss\.alpha"):
        Divergence("skew_kl", alpha=-0.1)


# ------------------------------------------------------------------------------------- two gloo ranks


def _rank_step(rank: int, port: int, divergence: Divergence, queue) -> None:
    """One rank's share of the batch, as KDTrainer takes it under DDP: its sums ('sum' reduction), the
    gradient all-reduced, both divided by the response tokens of all ranks."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        h_s, w_s, h_t, w_t, labels = make_batch(vocab_s=V + 3, vocab_t=V + 7)
        rows = slice(0, 2) if rank == 0 else slice(2, 3)
        h = h_s.detach()[rows].requires_grad_()
        out = chunked_kd_loss(
            h, w_s, h_t[rows], w_t, labels[rows], 0.4, 1.7, "sum", 4, vocab_size=V, divergence=divergence
        )
        (grad,) = torch.autograd.grad(out.loss, w_s)
        totals = torch.stack([out.loss.detach(), torch.tensor(float(out.tokens), dtype=out.loss.dtype)])
        dist.all_reduce(totals)
        dist.all_reduce(grad)
        if rank == 0:  # as numpy arrays, pickled by value: a tensor would travel as a shared-memory handle,
            # which the parent can no longer open once this process has exited (ConnectionResetError)
            queue.put(((totals[0] / totals[1]).numpy(), (grad / totals[1]).numpy()))
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_two_gloo_ranks_give_the_loss_and_gradient_of_one():
    divergence = Divergence("jsd", beta=0.3)
    h_s, w_s, h_t, w_t, labels = make_batch(vocab_s=V + 3, vocab_t=V + 7)
    one = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, 0.4, 1.7, chunk_size=4, vocab_size=V, divergence=divergence)
    (one_grad,) = torch.autograd.grad(one.loss, w_s)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_step, args=(rank, port, divergence, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    loss, grad = (torch.from_numpy(array) for array in queue.get(timeout=120))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    torch.testing.assert_close(loss, one.loss.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, one_grad, rtol=0, atol=1e-10)
