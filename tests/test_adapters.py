"""Tests for adapter rank conversion."""

from __future__ import annotations

import numpy as np
import pytest

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
    # Equal up to float32 rounding: the zero padding is exact, but BLAS may sum the longer
    # products in another order (seen with OpenBLAS's Haswell kernels).
    np.testing.assert_allclose(new_a @ new_b, a @ b, rtol=1e-6, atol=1e-6)
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


def test_rank_step_down_keeps_what_was_learned(tiny_workspace, tmp_path):
    """After an SVD rank step-down (8 -> 4) the validation loss stays near the rank-8 loss,
    far from the untrained model's, and the trainer resumes on the new rank."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from conftest import make_job, run_trainer, trainer_env
    from loractl.config import load_config
    from loractl.daemon.data import load_datasets
    from loractl.daemon.loop import LoopPlan, evaluate

    config = make_job(
        tiny_workspace, tmp_path, iters=160, learning_rate=3e-3, lr_schedule=None, val_batches=8
    )
    # Stop at step 30 of 40 the way a memory crash does: exit 75 after a checkpoint.
    first = run_trainer(config, "--fresh", env=trainer_env(LORACTL_FAULT_OOM="31:2"))
    assert first.returncode == 75, first.stderr
    cfg = load_config(config)
    checkpoint = tmp_path / "adapters" / "checkpoints" / "step-00000030"
    trained = dict(mx.load(str(checkpoint / "adapters.safetensors")))

    def val_loss(rank: int, weights: dict | None) -> float:
        model, tokenizer = load(str(tiny_workspace / "model"))
        model.freeze()
        params = {"rank": rank, "scale": cfg.lora_parameters.scale, "dropout": 0.0}
        linear_to_lora_layers(model, cfg.num_layers, params)
        if weights is not None:
            model.load_weights(list(weights.items()), strict=False)
        else:  # the untrained model: B = 0 makes every LoRA update zero
            zeros = {
                k: mx.zeros_like(v)
                for k, v in tree_flatten(model.parameters())
                if k.endswith("lora_b")
            }
            model.load_weights(list(zeros.items()), strict=False)
        data = load_datasets(cfg, tokenizer)
        plan = LoopPlan(
            total_examples=0,
            batch_size=1,
            grad_accumulation_steps=1,
            max_seq_length=cfg.max_seq_length,
            seed=0,
            steps_per_eval=1,
            val_batches=8,
        )
        return evaluate(model, data.valid, plan)

    expected = {k: tuple(v.shape) for k, v in trained.items()}
    for name in expected:
        if name.endswith("lora_a"):
            expected[name] = (expected[name][0], 4)
        elif name.endswith("lora_b"):
            expected[name] = (4, expected[name][1])
    fitted, notes = reconcile({k: np.array(v) for k, v in trained.items()}, expected)
    assert any("rank 8 -> 4" in n for n in notes)
    untrained = val_loss(8, None)
    rank8 = val_loss(8, trained)
    rank4 = val_loss(4, {k: mx.array(v) for k, v in fitted.items()})
    assert untrained - rank8 > 0.05, "training must have moved the loss for this test to mean much"
    assert abs(rank4 - rank8) < 0.25 * (untrained - rank8), (untrained, rank8, rank4)

    # The trainer itself resumes on rank 4 from that checkpoint, as the ladder would.
    resumed = run_trainer(config, "--overrides", json.dumps({"lora_parameters": {"rank": 4}}))
    assert resumed.returncode == 0, resumed.stderr
    log = (tmp_path / "adapters" / "train.log").read_text()
    assert "rank 8 -> 4 by SVD" in log
    shapes = {
        k: v.shape for k, v in mx.load(str(tmp_path / "adapters" / "adapters.safetensors")).items()
    }
    assert all(s[-1] == 4 for k, s in shapes.items() if k.endswith("lora_a"))


def random_switch_lora(experts=3, in_dims=24, out_dims=20, rank=8, seed=2):
    """Factors in mlx-lm's LoRASwitchLinear layout: A (experts, r, in), B (experts, out, r)."""
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(experts, rank, in_dims)).astype(np.float32),
        rng.normal(size=(experts, out_dims, rank)).astype(np.float32),
    )


def test_switch_rank_step_down_is_the_svd_truncation_of_each_expert():
    """For a mixture-of-experts layer each expert's B @ A is truncated to its best rank r."""
    a, b = random_switch_lora()
    new_a, new_b = convert_rank(a, b, 3)
    assert new_a.shape == (3, 3, 24) and new_b.shape == (3, 20, 3)
    for e in range(3):
        update = b[e].astype(np.float64) @ a[e].astype(np.float64)
        u, s, vt = np.linalg.svd(update, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vt[:3]
        np.testing.assert_allclose(new_b[e] @ new_a[e], best, rtol=1e-4, atol=1e-4)


def test_switch_rank_step_up_keeps_each_expert_update():
    """Growing a switch layer's rank keeps every B @ A and pads A with trainable rows."""
    a, b = random_switch_lora(rank=4)
    new_a, new_b = convert_rank(a, b, 8)
    assert new_a.shape == (3, 8, 24) and new_b.shape == (3, 20, 8)
    np.testing.assert_allclose(new_b @ new_a, b @ a, rtol=1e-6, atol=1e-6)
    assert np.abs(new_a[:, 4:]).sum() > 0 and not new_b[:, :, 4:].any()


def test_reconcile_converts_switch_pairs_next_to_linear_ones():
    """A checkpoint mixing linear and switch LoRA layers converts both to the new rank."""
    a, b = random_lora()
    sa, sb = random_switch_lora()
    saved = {"attn.lora_a": a, "attn.lora_b": b, "experts.lora_a": sa, "experts.lora_b": sb}
    expected = {
        "attn.lora_a": (48, 4),
        "attn.lora_b": (4, 40),
        "experts.lora_a": (3, 4, 24),
        "experts.lora_b": (3, 20, 4),
    }
    fitted, notes = reconcile(saved, expected)
    assert {k: v.shape for k, v in fitted.items()} == expected
    assert sorted(notes) == ["attn: rank 8 -> 4 by SVD", "experts: rank 8 -> 4 by SVD"]


def test_factors_of_unknown_layout_are_refused():
    """Factors that are neither 2-D nor 3-D pairs raise instead of converting wrongly."""
    with pytest.raises(ValueError, match="cannot convert"):
        convert_rank(np.zeros((2, 3)), np.zeros((1, 3, 2)), 1)
