"""The cached teacher: the sparse KD loss against its oracle (the dense forward KL), the cache's rows, and
its file (fingerprint, atomic manifest, rebuilt when torn or made differently)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from engine.config.load import load_config
from engine.train import teacher_cache
from engine.train.kd_loss import IGNORE_INDEX, kd_loss_reference, response_positions, sparse_kd_loss, teacher_logits
from engine.train.teacher_cache import CachedKDCollator, TeacherCache, sparse_rows

from .helpers import TINY_CONFIG

B, S, H, V = 3, 10, 6, 17
T = 2.0


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, S, H, generator=g, dtype=torch.float64).requires_grad_()
    w_s = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_()
    h_t = torch.randn(B, S, H, generator=g, dtype=torch.float64)
    w_t = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[:, :3] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX
    return h_s, w_s, h_t, w_t, labels


def cached_rows(h_t, w_t, labels, mode, width, generator=None):
    """The loss's (ids, log p, weights) as a cache of `mode` gives them, through TeacherCache.rows."""
    rows, _ = response_positions(labels)
    z = teacher_logits(h_t.reshape(-1, H).index_select(0, rows), w_t)
    ids, logprobs, counts, mass = sparse_rows(z, T, mode, width, generator)
    tensors = {"offsets": torch.tensor([0, len(rows)]), "ids": ids, "logprobs": logprobs, "mass": mass}
    if counts is not None:
        tensors["counts"] = counts
    return TeacherCache(mode, width, V, float(mass.mean()), tensors).rows(0)


def test_topk_with_k_equal_to_the_vocab_is_the_dense_forward_kl():
    h_s, w_s, h_t, w_t, labels = batch()
    dense = kd_loss_reference(h_s @ w_s.T, h_t @ w_t.T, labels, weight=0.4, temperature=T)
    sparse = sparse_kd_loss(h_s, w_s, *cached_rows(h_t, w_t, labels, "topk", V), labels, 0.4, T, chunk_size=4)
    for name in ("loss", "ce_loss", "kd_loss"):
        assert torch.allclose(getattr(sparse, name), getattr(dense, name), rtol=1e-10, atol=1e-12), name
    assert sparse.tokens == dense.tokens
    for a, b in zip(torch.autograd.grad(sparse.loss, (h_s, w_s)), torch.autograd.grad(dense.loss, (h_s, w_s))):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_topk_below_the_vocab_is_the_kl_to_the_truncated_teacher():
    """k < V drops the tail: not the dense KL (the documented bias), and the covered mass says how much."""
    h_s, w_s, h_t, w_t, labels = batch()
    dense = kd_loss_reference(h_s @ w_s.T, h_t @ w_t.T, labels, weight=1.0, temperature=T)
    ids, logprobs, weights = cached_rows(h_t, w_t, labels, "topk", 4)
    assert torch.allclose(weights.sum(-1), torch.ones(len(weights), dtype=weights.dtype))  # renormalised
    sparse = sparse_kd_loss(h_s, w_s, ids, logprobs, weights, labels, 1.0, T)
    assert not torch.isclose(sparse.kd_loss, dense.kd_loss, rtol=1e-3)


def test_sampled_tokens_average_to_the_dense_forward_kl():
    """Sparse Logit Sampling: each draw's KL is noisy, their mean converges to the dense value (unbiased)."""
    h_s, w_s, h_t, w_t, labels = batch(seed=1)
    dense = float(kd_loss_reference(h_s @ w_s.T, h_t @ w_t.T, labels, weight=1.0, temperature=T).kd_loss)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        draws = torch.tensor(
            [
                float(sparse_kd_loss(h_s, w_s, *cached_rows(h_t, w_t, labels, "sampled", 4, g), labels, 1.0, T).kd_loss)
                for _ in range(500)
            ]
        )
    error = abs(float(draws.mean()) - dense)
    assert error < 4 * float(draws.std()) / 500**0.5 and error < 0.05 * dense, (float(draws.mean()), dense)
    assert draws.std() > 0  # it is an estimate, not the dense value in disguise


def test_the_collator_lines_cached_rows_up_with_the_response_positions():
    """Each example's rows, concatenated in batch order, are the rows `response_positions` reads."""
    examples = [
        {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4], "cache_row": 1},
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "cache_row": 0},
    ]
    offsets = torch.tensor([0, 2, 4])  # example 0 of the cache: 2 rows, example 1: 2 rows
    ids = torch.arange(8, dtype=torch.int32).reshape(4, 2)
    tensors = {"offsets": offsets, "ids": ids, "logprobs": torch.zeros(4, 2), "mass": torch.ones(4)}
    out = CachedKDCollator(0, TeacherCache("topk", 0, V, 1.0, tensors))(examples)
    assert out["teacher_ids"].tolist() == [[4, 5], [6, 7], [0, 1], [2, 3]]
    assert len(response_positions(out["labels"])[0]) == 4


def test_sparse_loss_refuses_a_cache_made_for_other_data():
    h_s, w_s, h_t, w_t, labels = batch()
    ids, logprobs, weights = cached_rows(h_t, w_t, labels, "topk", 3)
    with pytest.raises(ValueError, match="made for other data"):
        sparse_kd_loss(h_s, w_s, ids[1:], logprobs[1:], weights[1:], labels, 0.5, T)


def test_the_cache_file_is_complete_only_with_its_manifest(tmp_path):
    parts = {"format": 1, "mode": "topk", "k": 2, "samples": None, "data": "abc"}
    tensors = {
        "offsets": torch.tensor([0, 1]),
        "ids": torch.tensor([[3, 1]], dtype=torch.int32),
        "logprobs": torch.tensor([[-0.5, -1.5]]),
        "mass": torch.tensor([0.83]),
    }
    manifest = teacher_cache.write(tmp_path, tensors, parts, assistant_rows=V)
    assert manifest["mean_mass"] == pytest.approx(0.83)
    cache, why = teacher_cache.load(tmp_path, parts)
    assert why == [] and torch.equal(cache.tensors["ids"], tensors["ids"]) and cache.assistant_rows == V

    assert teacher_cache.load(tmp_path, {**parts, "k": 4})[1] == ["k 2 -> 4"]  # made differently: says what
    (tmp_path / teacher_cache.DATA_FILE).write_bytes(b"torn")
    assert "not the size its manifest says" in teacher_cache.load(tmp_path, parts)[1][0]
    (tmp_path / teacher_cache.MANIFEST).unlink()  # a build stopped before its manifest
    assert teacher_cache.load(tmp_path, parts) == (None, ["no complete cache"])


def test_config_names_the_key_of_what_a_cache_cannot_do():
    config = load_config(TINY_CONFIG)
    assert config.train.distillation.knowledgedistillation.teacher_cache.mode == "off"  # today's behaviour
    data = config.model_dump()
    data["train"]["distillation"]["student_init"] = "assistant_layers"
    data["train"]["distillation"]["knowledgedistillation"]["teacher_cache"] = {"mode": "topk", "k": 8}
    with pytest.raises(ValidationError, match="teacher_cache.mode.*student_init"):
        type(config).model_validate(data)


def test_the_memory_plan_drops_the_assistant_and_sizes_the_cache():
    """`tas plan distill` with a cache: no assistant weights, forward or head; the cache's size per token."""
    from engine.config.keys import set_key
    from engine.plan.dims import load_dims
    from engine.plan.memory import distill_plan

    config = load_config(TINY_CONFIG)
    live = distill_plan(config, load_dims)
    set_key(config, "train.distillation.knowledgedistillation.teacher_cache.mode", "topk")
    set_key(config, "train.distillation.knowledgedistillation.teacher_cache.k", 64)
    cached = distill_plan(config, load_dims)
    assert any(t.what.startswith("assistant") for t in live.terms)
    assert not any(t.what.startswith("assistant") for t in cached.terms)
    assert cached.peak < live.peak
    tokens = config.train.distillation.per_device_train_batch_size * 256
    assert next(t.bytes for t in cached.terms if t.what.startswith("cached teacher")) == tokens * 64 * 12
    assert "516 B per answer token" in cached.note  # 64 x (4 B id + 4 B log-prob) + 4 B mass


def test_a_run_that_reused_another_runs_outputs_copies_its_matching_cache(tmp_path):
    """`tas run --reuse teacher=RUN`: RUN's cache is copied when made the same way, never when not."""
    from types import SimpleNamespace

    parts = {"format": 1, "mode": "topk", "k": 1, "data": "abc"}
    tensors = {"offsets": torch.tensor([0, 1]), "ids": torch.tensor([[3]]), "logprobs": torch.zeros(1, 1)}
    teacher_cache.write(tmp_path / "A" / "distill" / "teacher_cache", {**tensors, "mass": torch.ones(1)}, parts, V)
    run = SimpleNamespace(reused={"teacher": "A"}, path=tmp_path / "B")
    ctx = SimpleNamespace(run=run, stage="distill")
    ours = tmp_path / "B" / "distill" / "teacher_cache"
    assert teacher_cache.copy_from_reused_run(ctx, ours, {**parts, "k": 2}) is None
    assert teacher_cache.copy_from_reused_run(ctx, ours, parts) == "A"
    assert teacher_cache.check(ours, parts)[1] == []
