"""Tests for adapter rank conversion."""

from __future__ import annotations

import numpy as np

from loractl.daemon.adapters import convert_rank, reconcile


def random_lora(in_dims=48, out_dims=40, rank=8, seed=1):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(in_dims, rank)).astype(np.float32),
        rng.normal(size=(rank, out_dims)).astype(np.float32),
    )


def test_rank_step_down_is_the_svd_truncation():
    """A' @ B' equals the best rank-r approximation of A @ B (Eckart-Young)."""
    a, b = random_lora()
    new_a, new_b = convert_rank(a, b, 4)
    assert new_a.shape == (48, 4) and new_b.shape == (4, 40)
    update = a.astype(np.float64) @ b.astype(np.float64)
    u, s, vt = np.linalg.svd(update, full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vt[:4]
    np.testing.assert_allclose(new_a @ new_b, best, rtol=1e-4, atol=1e-4)
    error = np.linalg.norm(update - new_a.astype(np.float64) @ new_b)
    assert np.isclose(error, np.sqrt((s[4:] ** 2).sum()), rtol=1e-4)


def test_rank_step_down_to_the_same_rank_keeps_the_update():
    """Converting to the same rank reproduces the product exactly (up to float error)."""
    a, b = random_lora()
    new_a, new_b = convert_rank(a, b, 8)
    np.testing.assert_allclose(new_a @ new_b, a @ b, rtol=1e-4, atol=1e-3)


def test_rank_step_up_keeps_the_update_and_leaves_room_to_learn():
    """Growing the rank keeps A @ B and pads A with non-zero columns so they can train."""
    a, b = random_lora(rank=4)
    new_a, new_b = convert_rank(a, b, 8)
    np.testing.assert_array_equal(new_a @ new_b, a @ b)
    assert np.abs(new_a[:, 4:]).sum() > 0 and not new_b[4:].any()


def test_reconcile_converts_pairs_and_drops_missing_layers():
    """reconcile converts mismatched LoRA pairs and reports tensors it could not keep."""
    a, b = random_lora()
    saved = {
        "layers.0.q.lora_a": a,
        "layers.0.q.lora_b": b,
        "layers.1.q.lora_a": a,
        "layers.1.q.lora_b": b,
    }
    expected = {"layers.0.q.lora_b": (4, 40), "layers.0.q.lora_a": (48, 4)}
    fitted, notes = reconcile(saved, expected)
    assert fitted["layers.0.q.lora_a"].shape == (48, 4)
    assert fitted["layers.0.q.lora_b"].shape == (4, 40)
    assert any("rank 8 -> 4" in n for n in notes)
    assert any("2 tensors not in the model" in n for n in notes)
