"""Adapter tensors: rank conversion and restoring a checkpoint into a model that may differ.

A LoRA layer computes ``x @ W.T + scale * (x @ A) @ B`` with ``A`` of shape (in, r) and ``B``
of shape (r, out), so its learned update is ``scale * A @ B``. Stepping the rank down keeps
the best rank-r' approximation of that update (Eckart-Young: the SVD truncation), so the
progress made so far survives a ladder step instead of being thrown away. Stepping up pads
``A`` with fresh random columns and ``B`` with zero rows: the update is unchanged and the new
directions can still learn (if both pads were zero their gradients would stay zero).
"""

from __future__ import annotations

import numpy as np


def convert_rank(
    lora_a: np.ndarray, lora_b: np.ndarray, new_rank: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Return (A', B') of rank ``new_rank`` whose product best approximates ``A @ B``."""
    in_dims, old_rank = lora_a.shape
    if lora_b.shape[0] != old_rank:
        raise ValueError(f"lora_a {lora_a.shape} and lora_b {lora_b.shape} disagree on rank")
    dtype = lora_a.dtype
    if new_rank <= old_rank:
        update = lora_a.astype(np.float64) @ lora_b.astype(np.float64)
        u, s, vt = np.linalg.svd(update, full_matrices=False)
        root = np.sqrt(s[:new_rank])
        new_a = u[:, :new_rank] * root[None, :]
        new_b = root[:, None] * vt[:new_rank]
        return new_a.astype(dtype), new_b.astype(dtype)
    extra = new_rank - old_rank
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(in_dims)
    pad_a = rng.uniform(-bound, bound, size=(in_dims, extra)).astype(dtype)
    pad_b = np.zeros((extra, lora_b.shape[1]), dtype=dtype)
    return np.concatenate([lora_a, pad_a], axis=1), np.concatenate([lora_b, pad_b], axis=0)


def reconcile(
    saved: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], seed: int = 0
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Fit saved adapter tensors to the shapes a model expects.

    Returns the tensors to load and a list of notes about what had to change. Rank changes are
    converted pairwise; tensors the model no longer has (fewer layers) are dropped; tensors
    the model newly has keep their fresh initialisation.
    """
    out: dict[str, np.ndarray] = {}
    notes: list[str] = []
    for name, shape in expected.items():
        if name not in saved:
            notes.append(f"{name}: not in checkpoint, freshly initialised")
            continue
        tensor = saved[name]
        if tuple(tensor.shape) == tuple(shape):
            out[name] = tensor
            continue
        if name.endswith(".lora_a"):
            partner = name[: -len("lora_a")] + "lora_b"
            if partner in saved and partner in expected:
                new_rank = shape[1]
                new_a, new_b = convert_rank(tensor, saved[partner], new_rank, seed)
                out[name], out[partner] = new_a, new_b
                notes.append(f"{name[:-7]}: rank {tensor.shape[1]} -> {new_rank} by SVD")
                continue
        if name.endswith(".lora_b"):
            partner = name[: -len("lora_b")] + "lora_a"
            if partner in saved and partner in expected:
                continue  # converted together with its lora_a
        notes.append(f"{name}: shape {tuple(tensor.shape)} != {tuple(shape)}, reinitialised")
    dropped = sorted(set(saved) - set(expected))
    if dropped:
        notes.append(f"{len(dropped)} tensors not in the model were dropped")
    return out, notes
