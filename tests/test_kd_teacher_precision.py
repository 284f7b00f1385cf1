"""The KD teacher's logits are computed in float32 even when the teacher hands over bf16 hidden states and
head (a bf16 or 4-bit assistant): a bf16 matmul rounds every logit to 8 bits of mantissa, noise in the
distribution the student learns from (issue 22, finding 11)."""

from __future__ import annotations

import torch

from engine.train.kd_loss import IGNORE_INDEX, chunked_kd_loss, kd_loss_reference

B, S, H, V = 2, 24, 64, 256


def test_bf16_teacher_logits_match_the_float32_product_of_the_same_weights():
    g = torch.Generator().manual_seed(0)
    # a teacher stored in bf16, with logits of a real model's spread (tens), and a student late in its
    # training, close to it: the KL is small, and the teacher's rounding would be a large share of it
    h_t = (torch.randn(B, S, H, generator=g) * 2).bfloat16()
    w_t = (torch.randn(V, H, generator=g) * 1.5).bfloat16()
    h_s = h_t.float().requires_grad_()
    w_s = (w_t.float() + 0.01 * torch.randn(V, H, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[:, :4] = IGNORE_INDEX
    kw = dict(weight=1.0, temperature=1.0)

    # the oracle: the same bf16 weights, multiplied in float32
    ref = kd_loss_reference(h_s @ w_s.T, h_t.float() @ w_t.float().T, labels, **kw)
    rounded = kd_loss_reference(h_s @ w_s.T, h_t @ w_t.T, labels, **kw)  # the old way: logits made in bf16
    out = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, chunk_size=7, **kw)

    old_error = abs(rounded.kd_loss.item() - ref.kd_loss.item()) / ref.kd_loss.item()
    new_error = abs(out.kd_loss.item() - ref.kd_loss.item()) / ref.kd_loss.item()
    assert old_error > 1e-2, old_error  # what bf16 logits cost on this batch
    assert new_error < 1e-5, new_error
    g_out, g_ref = torch.autograd.grad(out.loss, w_s), torch.autograd.grad(ref.loss, w_s)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-6)


def test_teacher_logits_stay_float32_under_bf16_autocast():
    """The Trainer's bf16 training runs compute_loss beside an autocast forward; the teacher's product must not
    drop back to bf16 there."""
    g = torch.Generator().manual_seed(1)
    h_s, w_s = torch.randn(B, S, H, generator=g), torch.randn(V, H, generator=g) / H**0.5
    h_t, w_t = (torch.randn(B, S, H, generator=g) * 2).bfloat16(), (torch.randn(V, H, generator=g) * 1.5).bfloat16()
    labels = torch.randint(0, V, (B, S), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, 1.0, 1.0, chunk_size=7)
    # autocast runs the student's product in bf16 (as it would anyway): the oracle rounds the student's logits
    # the same way, and takes the teacher's in float32
    student = (h_s.bfloat16() @ w_s.bfloat16().T).float()
    ref = kd_loss_reference(student, h_t.float() @ w_t.float().T, labels, 1.0, 1.0)
    assert abs(out.kd_loss.item() - ref.kd_loss.item()) / ref.kd_loss.item() < 1e-5
