"""The KD loss: the chunked paths equal the direct computation, and only response tokens count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.train.kd_loss import (
    IGNORE_INDEX,
    chunked_kd_loss,
    chunked_kd_loss_from_logits,
    kd_loss_reference,
    next_token_targets,
)

B, S, H_S, H_T, V = 3, 10, 6, 8, 17


def make_batch(dtype=torch.float64, vocab_s=V, vocab_t=V, seed=0):
    """Student/teacher hidden states and heads, and labels with a prompt, padding and a short row."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, S, H_S, generator=g, dtype=dtype)
    w_s = torch.randn(vocab_s, H_S, generator=g, dtype=dtype)
    h_t = torch.randn(B, S, H_T, generator=g, dtype=dtype)
    w_t = torch.randn(vocab_t, H_T, generator=g, dtype=dtype)
    labels = torch.randint(0, min(vocab_s, vocab_t), (B, S), generator=g)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 7:] = IGNORE_INDEX  # right padding
    labels[2, :6] = IGNORE_INDEX  # long prompt
    return h_s.requires_grad_(), w_s.requires_grad_(), h_t, w_t, labels


def grads(out, *tensors):
    return torch.autograd.grad(out.loss, tensors)


def test_next_token_targets_is_the_causal_shift():
    labels = torch.tensor([[-100, 5, 6, 7], [-100, -100, 8, -100]])
    assert next_token_targets(labels).tolist() == [[5, 6, 7, -100], [-100, 8, -100, -100]]


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_equals_reference_values_and_grads(reduction, chunk_size):
    h_s, w_s, h_t, w_t, labels = make_batch()
    kw = dict(weight=0.3, temperature=2.0, reduction=reduction)
    ref = kd_loss_reference(h_s @ w_s.T, h_t @ w_t.T, labels, **kw)
    ref_grads = grads(ref, h_s, w_s)

    hidden = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, chunk_size=chunk_size, **kw)
    for got, want in zip(grads(hidden, h_s, w_s), ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    logits = (h_s @ w_s.T).detach().requires_grad_()
    ref_l = kd_loss_reference(logits, h_t @ w_t.T, labels, **kw)
    from_logits = chunked_kd_loss_from_logits(logits, h_t @ w_t.T, labels, chunk_size=chunk_size, **kw)
    torch.testing.assert_close(grads(from_logits, logits)[0], grads(ref_l, logits)[0], rtol=0, atol=1e-5)

    for out in (hidden, from_logits):
        assert out.tokens == ref.tokens == int((next_token_targets(labels) != IGNORE_INDEX).sum())
        for name in ("loss", "ce_loss", "kd_loss"):
            torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=1e-5)


def test_float32_and_bf16_inputs_agree_with_reference():
    h_s, w_s, h_t, w_t, labels = make_batch(dtype=torch.float32)
    ref = kd_loss_reference(h_s @ w_s.T, h_t @ w_t.T, labels, 0.5, 0.7)
    out = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, 0.5, 0.7, chunk_size=5)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    # bf16 logits are upcast before the softmax: close to the float32 value, and float32 out
    bf = kd_loss_reference((h_s @ w_s.T).bfloat16(), (h_t @ w_t.T).bfloat16(), labels, 0.5, 0.7)
    assert bf.loss.dtype == torch.float32 and abs(bf.loss.item() - ref.loss.item()) < 0.05


def test_masked_positions_contribute_nothing():
    h_s, w_s, h_t, w_t, labels = make_batch()
    targets = next_token_targets(labels)
    masked = (targets == IGNORE_INDEX).unsqueeze(-1)
    s_logits = (h_s @ w_s.T).detach().requires_grad_()
    t_logits = h_t @ w_t.T
    kw = dict(weight=0.4, temperature=1.5)
    base = kd_loss_reference(s_logits, t_logits, labels, **kw)
    base_grad = grads(base, s_logits)[0]
    assert torch.all(base_grad.masked_select(masked) == 0)

    g = torch.Generator().manual_seed(1)
    noisy_s = torch.where(masked, 50 * torch.randn(s_logits.shape, generator=g, dtype=s_logits.dtype), s_logits)
    noisy_s = noisy_s.detach().requires_grad_()
    noisy_t = torch.where(masked, -30 * torch.randn(t_logits.shape, generator=g, dtype=t_logits.dtype), t_logits)
    for fn in (kd_loss_reference, chunked_kd_loss_from_logits):
        out = fn(noisy_s, noisy_t, labels, **kw)
        torch.testing.assert_close(out.loss, base.loss, rtol=0, atol=1e-10)
        torch.testing.assert_close(grads(out, noisy_s)[0], base_grad, rtol=0, atol=1e-10)

    # the same through the hidden-state path: garbage hidden states at masked positions change nothing
    noisy_h = torch.where(masked, 9 * torch.randn(h_s.shape, generator=g, dtype=h_s.dtype), h_s).detach()
    noisy_ht = torch.where(masked, 9 * torch.randn(h_t.shape, generator=g, dtype=h_t.dtype), h_t)
    out = chunked_kd_loss(noisy_h.requires_grad_(), w_s, noisy_ht, w_t, labels, chunk_size=3, **kw)
    torch.testing.assert_close(out.loss, base.loss, rtol=0, atol=1e-10)


def test_matches_hand_formula():
    """One row, two response tokens: (1 - w)·CE + w·T²·KL with F.cross_entropy and F.kl_div by hand."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(1, 4, 5, generator=g, dtype=torch.float64)
    t = torch.randn(1, 4, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 2, 4]])  # positions 1 and 2 predict labels 2 and 4
    w, temp = 0.25, 3.0
    pos = [1, 2]
    ce = F.cross_entropy(s[0, pos], torch.tensor([2, 4]), reduction="mean")
    kl = F.kl_div(
        F.log_softmax(s[0, pos] / temp, -1), F.log_softmax(t[0, pos] / temp, -1), log_target=True, reduction="batchmean"
    )
    expected = (1 - w) * ce + w * temp**2 * kl
    for out in (
        kd_loss_reference(s, t, labels, w, temp, "batchmean"),
        chunked_kd_loss_from_logits(s, t, labels, w, temp, "mean", chunk_size=1),
    ):
        assert out.tokens == 2
        torch.testing.assert_close(out.loss, expected)
        torch.testing.assert_close(out.ce_loss, ce)
        torch.testing.assert_close(out.kd_loss, temp**2 * kl)
    total = kd_loss_reference(s, t, labels, w, temp, "sum")
    torch.testing.assert_close(total.loss, 2 * expected)


def test_weight_zero_is_plain_ce_and_skips_the_teacher():
    h_s, w_s, h_t, w_t, labels = make_batch()
    targets = next_token_targets(labels)
    ce = F.cross_entropy((h_s @ w_s.T).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    out = chunked_kd_loss(h_s, w_s, None, None, labels, weight=0.0, temperature=2.0, chunk_size=4)
    torch.testing.assert_close(out.loss, ce)
    assert out.kd_loss.item() == 0.0
    out = chunked_kd_loss_from_logits(h_s @ w_s.T, None, labels, weight=0.0, temperature=2.0)
    torch.testing.assert_close(out.loss, ce)
    out = kd_loss_reference(h_s @ w_s.T, None, labels, weight=0.0, temperature=2.0)
    torch.testing.assert_close(out.loss, ce)
    with pytest.raises(ValueError, match="teacher"):
        chunked_kd_loss(h_s, w_s, None, None, labels, weight=0.1, temperature=2.0)


def test_temperature_squared_scaling():
    h_s, w_s, h_t, w_t, labels = make_batch()
    s, t = h_s @ w_s.T, h_t @ w_t.T
    for temp in (0.5, 1.0, 4.0):
        out = kd_loss_reference(s, t, labels, weight=1.0, temperature=temp)
        mask = next_token_targets(labels) != IGNORE_INDEX
        kl = F.kl_div(
            F.log_softmax(s[mask] / temp, -1), F.log_softmax(t[mask] / temp, -1), log_target=True, reduction="batchmean"
        )
        torch.testing.assert_close(out.kd_loss, temp**2 * kl)
        torch.testing.assert_close(out.loss, out.kd_loss)  # weight 1: the KD term alone
    # the student equal to the teacher: KL is 0 at any temperature
    assert kd_loss_reference(t, t, labels, 1.0, 3.0).kd_loss.abs().item() < 1e-12


def test_vocab_crop():
    """The teacher's padded columns are dropped (probability 0); the student keeps its full softmax."""
    h_s, w_s, h_t, w_t, labels = make_batch(vocab_s=V + 3, vocab_t=V + 7)
    s, t = h_s @ w_s.T, h_t @ w_t.T
    kw = dict(weight=0.6, temperature=2.0, vocab_size=V)
    ref = kd_loss_reference(s, t, labels, **kw)
    # equivalent: a teacher whose extra columns are -inf, i.e. truly impossible tokens
    t_padded = torch.cat([t[..., :V], torch.full((B, S, 3), float("-inf"), dtype=t.dtype)], -1)
    same = kd_loss_reference(s, t_padded, labels, weight=0.6, temperature=2.0)
    torch.testing.assert_close(ref.loss, same.loss)
    out = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, chunk_size=4, **kw)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-5)
    for got, want in zip(grads(out, h_s, w_s), grads(ref, h_s, w_s)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked_kd_loss_from_logits(s, t, labels, chunk_size=5, **kw).loss, ref.loss)
    with pytest.raises(ValueError, match="vocab_size"):
        kd_loss_reference(s, t, labels, 0.5, 2.0)  # sizes differ and no crop given
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_kd_loss(h_s, w_s, h_t, w_t, labels, 0.5, 2.0, vocab_size=V + 4)  # past the student's head


def test_all_masked_batch_is_zero_with_no_tokens():
    h_s, w_s, h_t, w_t, labels = make_batch()
    labels[:] = IGNORE_INDEX
    labels[:, 0] = 5  # no position predicts the first token: still no response token after the shift
    for out in (
        chunked_kd_loss(h_s, w_s, h_t, w_t, labels, 0.5, 2.0),
        chunked_kd_loss_from_logits(h_s @ w_s.T, h_t @ w_t.T, labels, 0.5, 2.0),
        kd_loss_reference(h_s @ w_s.T, h_t @ w_t.T, labels, 0.5, 2.0),
    ):
        assert out.tokens == 0 and out.loss.item() == 0.0
        gh, gw = grads(out, h_s, w_s)  # backward works and gives zero gradients
        assert not gh.any() and not gw.any()


def test_bad_arguments():
    h_s, w_s, h_t, w_t, labels = make_batch()
    s = h_s @ w_s.T
    with pytest.raises(ValueError, match="reduction"):
        kd_loss_reference(s, s, labels, 0.5, 2.0, reduction="none")
    with pytest.raises(ValueError, match="temperature"):
        kd_loss_reference(s, s, labels, 0.5, 0.0)
    with pytest.raises(ValueError, match="weight"):
        kd_loss_reference(s, s, labels, 1.5, 1.0)
    with pytest.raises(ValueError, match="teacher"):
        kd_loss_reference(s, s[:, :-1], labels, 0.5, 1.0)


def test_no_grad_eval_path():
    h_s, w_s, h_t, w_t, labels = make_batch()
    with torch.no_grad():
        out = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, 0.5, 2.0, chunk_size=4)
        ref = kd_loss_reference(h_s @ w_s.T, h_t @ w_t.T, labels, 0.5, 2.0)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, ref.loss)
    assert set(out.metrics()) == {"loss", "ce_loss", "kd_loss", "tokens"}
