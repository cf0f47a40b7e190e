"""Datasets and a resumable data order.

Loading goes through mlx-lm's own dataset classes (text, completions, chat), but every JSONL
line is parsed here first so that a bad line is reported with its file and line number instead
of a bare traceback. The order of examples is a pure function of (seed, epoch) and the number
of examples already consumed, so a resumed run (even at another batch size or accumulation)
picks up exactly where the checkpoint left off: no example repeated, none skipped.
"""

from __future__ import annotations

import json
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.tuner.datasets import CacheDataset, create_dataset

from loractl.config import JobConfig

# mlx-lm pads each batch to one plus a multiple of this, so compiled shapes repeat.
PAD_MULTIPLE = 32


class DataError(ValueError):
    """Bad training data: retrying cannot help (exit 65)."""


FORMAT_KEYS = {
    "completions": ("prompt_feature", "completion_feature"),
    "chat": ("chat_feature",),
    "text": ("text_feature",),
}


def _format_of(sample: dict, cfg: JobConfig) -> str | None:
    if cfg.prompt_feature in sample and cfg.completion_feature in sample:
        return "completions"
    if cfg.chat_feature in sample:
        return "chat"
    if cfg.text_feature in sample:
        return "text"
    return None


def read_jsonl(path: Path, cfg: JobConfig) -> list[dict]:
    """Parse a JSONL file, checking that every line is a sample of the first line's format."""
    samples: list[dict] = []
    expected: str | None = None
    try:
        handle = path.open("r", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    sample = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
                if not isinstance(sample, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object per line")
                fmt = _format_of(sample, cfg)
                if fmt is None:
                    wanted = " or ".join(
                        repr(getattr(cfg, key)) for keys in FORMAT_KEYS.values() for key in keys
                    )
                    raise DataError(
                        f"{path}:{number}: sample has none of the keys {wanted} "
                        f"(found {sorted(sample)[:6]})"
                    )
                if expected is None:
                    expected = fmt
                elif fmt != expected:
                    raise DataError(
                        f"{path}:{number}: sample is in {fmt} format but the file's first "
                        f"sample is in {expected} format"
                    )
                _check_fields(path, number, sample, fmt, cfg)
                samples.append(sample)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return samples


def _check_fields(path: Path, number: int, sample: dict, fmt: str, cfg: JobConfig) -> None:
    if fmt == "text":
        if not isinstance(sample[cfg.text_feature], str) or not sample[cfg.text_feature]:
            raise DataError(f"{path}:{number}: {cfg.text_feature!r} must be a non-empty string")
    elif fmt == "completions":
        for key in (cfg.prompt_feature, cfg.completion_feature):
            if not isinstance(sample[key], str):
                raise DataError(f"{path}:{number}: {key!r} must be a string")
    else:
        messages = sample[cfg.chat_feature]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{path}:{number}: {cfg.chat_feature!r} must be a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or "role" not in message:
                raise DataError(
                    f"{path}:{number}: each message needs a 'role' and a 'content'"
                )


@dataclass
class Datasets:
    train: CacheDataset
    valid: CacheDataset | None
    test: CacheDataset | None


def load_datasets(cfg: JobConfig, tokenizer) -> Datasets:
    """Load train/valid/test from a local folder, tokenizing every training sample up front.

    Tokenizing eagerly surfaces a sample the tokenizer or chat template rejects now, with its
    line number, rather than an hour into the night.
    """
    folder = Path(cfg.data)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist (expected train.jsonl in it)")
    options = types.SimpleNamespace(**cfg.to_dict())
    splits: dict[str, CacheDataset | None] = {}
    splits_needed = ("train", "valid", "test") if cfg.test else ("train", "valid")
    for split in ("train", "valid", "test"):
        path = folder / f"{split}.jsonl"
        if split not in splits_needed or not path.exists():
            splits[split] = None
            continue
        samples = read_jsonl(path, cfg)
        if not samples:
            splits[split] = None
            continue
        try:
            dataset = CacheDataset(create_dataset(samples, tokenizer, options))
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from None
        for index in range(len(dataset)):
            try:
                tokens, _offset = dataset[index]
            except Exception as exc:  # the tokenizer or a chat template may raise anything
                raise DataError(f"{path}:{index + 1}: cannot tokenize sample: {exc}") from None
            if len(tokens) < 2:
                raise DataError(f"{path}:{index + 1}: sample has fewer than 2 tokens")
            # int32 arrays instead of lists of Python ints: 4 bytes a token instead of ~36.
            dataset._proc_data[index] = (np.asarray(tokens, dtype=np.int32), _offset)
        splits[split] = dataset
    train = splits["train"]
    if train is None:
        raise DataError(f"{folder / 'train.jsonl'}: missing or empty; a training set is needed")
    if len(train) < cfg.batch_size:
        raise DataError(
            f"{folder / 'train.jsonl'}: {len(train)} samples, fewer than batch_size "
            f"{cfg.batch_size}"
        )
    return Datasets(train=train, valid=splits["valid"], test=splits["test"])


class ExampleOrder:
    """Which example comes at every position of the run, across epochs.

    Position p belongs to epoch p // n and is the (p % n)-th entry of that epoch's
    permutation, seeded by (seed, epoch) alone. Resuming from "examples seen" therefore needs
    no saved iterator, and is indifferent to batch size or accumulation changes.
    """

    def __init__(self, num_examples: int, seed: int):
        self.num_examples = num_examples
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, epoch])
            self._cache = {epoch: rng.permutation(self.num_examples)}
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.num_examples)
            out.append(int(self.permutation(epoch)[offset]))
        return out


def make_batch(
    dataset: CacheDataset, indices: Sequence[int], max_seq_length: int
) -> tuple[mx.array, mx.array]:
    """Pad samples into one batch the way mlx-lm does, returning (tokens, [offset, length])."""
    samples = [dataset[i] for i in indices]
    lengths = [min(len(tokens), max_seq_length) for tokens, _ in samples]
    width = 1 + PAD_MULTIPLE * ((max(lengths) + PAD_MULTIPLE - 1) // PAD_MULTIPLE)
    width = min(width, max_seq_length)
    tokens = np.zeros((len(samples), width), np.int32)
    for row, ((sample, _), length) in enumerate(zip(samples, lengths, strict=True)):
        tokens[row, :length] = sample[:length]
    offsets = [offset for _, offset in samples]
    return mx.array(tokens), mx.array(list(zip(offsets, lengths, strict=True)))


def eval_batches(dataset: CacheDataset, batch_size: int, num_batches: int, max_seq_length: int):
    """A fixed, unshuffled sequence of validation batches, so every evaluation compares alike."""
    total = len(dataset) // batch_size
    if num_batches != -1:
        total = min(total, num_batches)
    for b in range(total):
        yield make_batch(
            dataset, range(b * batch_size, (b + 1) * batch_size), max_seq_length
        )
