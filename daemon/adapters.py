"""Adapter tensors: rank conversion and restoring a checkpoint into a model that may differ.

mlx-lm's LoRA layers keep their low-rank factors in two layouts:

- ``LoRALinear`` and ``LoRAEmbedding``: ``lora_a`` (in, r) and ``lora_b`` (r, out); the
  learned update is ``scale * A @ B``, an (in, out) matrix;
- ``LoRASwitchLinear`` (the experts of a mixture-of-experts block, ``SwitchLinear``):
  ``lora_a`` (experts, r, in) and ``lora_b`` (experts, out, r); expert e's update is
  ``scale * B[e] @ A[e]``, an (out, in) matrix, one per expert.

Stepping the rank down keeps the best rank-r' approximation of each update (Eckart-Young: the
SVD truncation), expert by expert for a switch layer, so the progress made so far survives a
ladder step instead of being thrown away. Stepping up pads ``A`` with fresh random directions
and ``B`` with zeros: the update is unchanged and the new directions can still learn (if both
pads were zero their gradients would stay zero).
"""

from __future__ import annotations

import numpy as np


def _truncate(update: np.ndarray, new_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(L, R) with L @ R the best rank-``new_rank`` approximation of ``update``."""
    u, s, vt = np.linalg.svd(update, full_matrices=False)
    root = np.sqrt(s[:new_rank])
    return u[:, :new_rank] * root[None, :], root[:, None] * vt[:new_rank]


def _convert_linear(
    lora_a: np.ndarray, lora_b: np.ndarray, new_rank: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    in_dims, old_rank = lora_a.shape
    if lora_b.shape[0] != old_rank:
        raise ValueError(f"lora_a {lora_a.shape} and lora_b {lora_b.shape} disagree on rank")
    dtype = lora_a.dtype
    if new_rank <= old_rank:
        new_a, new_b = _truncate(lora_a.astype(np.float64) @ lora_b.astype(np.float64), new_rank)
        return new_a.astype(dtype), new_b.astype(dtype)
    extra = new_rank - old_rank
    bound = 1.0 / np.sqrt(in_dims)
    pad_a = rng.uniform(-bound, bound, size=(in_dims, extra)).astype(dtype)
    pad_b = np.zeros((extra, lora_b.shape[1]), dtype=dtype)
    return np.concatenate([lora_a, pad_a], axis=1), np.concatenate([lora_b, pad_b], axis=0)


def _convert_switch(
    lora_a: np.ndarray, lora_b: np.ndarray, new_rank: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    experts, old_rank, in_dims = lora_a.shape
    if lora_b.shape[0] != experts or lora_b.shape[2] != old_rank:
        raise ValueError(
            f"switch lora_a {lora_a.shape} and lora_b {lora_b.shape} disagree on experts or rank"
        )
    dtype = lora_a.dtype
    if new_rank <= old_rank:
        new_a = np.empty((experts, new_rank, in_dims), dtype=dtype)
        new_b = np.empty((experts, lora_b.shape[1], new_rank), dtype=dtype)
        for e in range(experts):
            update = lora_b[e].astype(np.float64) @ lora_a[e].astype(np.float64)
            left, right = _truncate(update, new_rank)
            new_b[e], new_a[e] = left.astype(dtype), right.astype(dtype)
        return new_a, new_b
    extra = new_rank - old_rank
    # mlx-lm initialises a switch layer's A uniformly in +-1/sqrt(in), like a linear layer's.
    bound = 1.0 / np.sqrt(in_dims)
    pad_a = rng.uniform(-bound, bound, size=(experts, extra, in_dims)).astype(dtype)
    pad_b = np.zeros((experts, lora_b.shape[1], extra), dtype=dtype)
    return np.concatenate([lora_a, pad_a], axis=1), np.concatenate([lora_b, pad_b], axis=2)


def convert_rank(
    lora_a: np.ndarray, lora_b: np.ndarray, new_rank: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Return (A', B') of rank ``new_rank`` whose product best approximates that of (A, B).

    2-D factors are a linear or embedding layer's, 3-D ones a switch (mixture-of-experts)
    layer's, converted expert by expert.
    """
    rng = np.random.default_rng(seed)
    if lora_a.ndim == 2 and lora_b.ndim == 2:
        return _convert_linear(lora_a, lora_b, new_rank, rng)
    if lora_a.ndim == 3 and lora_b.ndim == 3:
        return _convert_switch(lora_a, lora_b, new_rank, rng)
    raise ValueError(f"cannot convert LoRA factors of shapes {lora_a.shape} and {lora_b.shape}")


def rank_of(lora_a_shape: tuple[int, ...]) -> int:
    """The rank a ``lora_a`` of this shape has: axis 1 in both of mlx-lm's layouts."""
    return lora_a_shape[1]


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
    # Each lora_a before any lora_b, so a pair is converted at its lora_a.
    for name, shape in sorted(expected.items(), key=lambda item: not item[0].endswith(".lora_a")):
        if name not in saved:
            notes.append(f"{name}: not in checkpoint, freshly initialised")
            continue
        tensor = saved[name]
        if tuple(tensor.shape) == tuple(shape):
            out[name] = tensor
            continue
        if name.endswith(".lora_a"):
            partner = name[: -len("lora_a")] + "lora_b"
            if partner in saved and partner in expected and tensor.ndim == len(shape):
                new_rank = rank_of(tuple(shape))
                new_a, new_b = convert_rank(tensor, saved[partner], new_rank, seed)
                if new_b.shape == tuple(expected[partner]):
                    out[name], out[partner] = new_a, new_b
                    notes.append(f"{name[:-7]}: rank {rank_of(tensor.shape)} -> {new_rank} by SVD")
                    continue
        if name.endswith(".lora_b"):
            partner = name[: -len("lora_b")] + "lora_a"
            if partner in out:
                continue  # converted together with its lora_a
        notes.append(f"{name}: shape {tuple(tensor.shape)} != {tuple(shape)}, reinitialised")
    dropped = sorted(set(saved) - set(expected))
    if dropped:
        notes.append(f"{len(dropped)} tensors not in the model were dropped")
    return out, notes
