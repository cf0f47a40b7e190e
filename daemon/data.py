"""Datasets, batches and a resumable data order.

Loading goes through mlx-lm's own parts: its dataset classes (text, completions, chat) for a
local folder, and its ``load_dataset`` for a Hugging Face dataset (``data: org/name`` or
``hf_dataset:``). For a local folder every JSONL line is parsed here first, so a bad line is
reported with its file and line number instead of a bare traceback. Every sample is tokenized
up front, through the mlx-lm dataset's own ``process``: a sample the tokenizer or a chat
template rejects fails now, not an hour into the night, and the token lengths are known for
batching.

Batches are made the way mlx-lm's ``iterate_batches`` makes them: examples sorted by length are
cut into batches, and each epoch visits the batches in a shuffled order. The order is a pure
function of (seed, epoch, batch size) and the number of examples already consumed, so a
resumed run, even at another accumulation, picks up exactly where the checkpoint left off: no
example repeated, none skipped (see ``ExampleOrder``).
"""

from __future__ import annotations

import json
import os
import stat
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx
import numpy as np
from mlx_lm.tuner.datasets import create_dataset

from loractl.config import JobConfig, data_file_problem, file_kind

# mlx-lm pads each batch to one plus a multiple of this, so compiled shapes repeat.
PAD_MULTIPLE = 32
MB = 1024 * 1024
# Lines read (samples tokenized) between two signs of life while loading.
PROGRESS_EVERY = 2000


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


def json_error_words(exc: json.JSONDecodeError) -> str:
    """The decoder's message with its column, as one whole phrase.

    ``exc.msg`` alone can end mid-sentence ("Invalid control character at"); the column is
    the rest of it. The decoder's own line number counts within the JSONL line, so it is left
    out: the caller names the file's line.
    """
    joiner = " " if exc.msg.endswith(" at") else " at "
    return f"{exc.msg}{joiner}column {exc.colno}"


def open_data_file(path: Path) -> BinaryIO:
    """Open a data file for reading, refusing anything but a regular file.

    A FIFO would block the open (and the trainer, in "loading") until someone writes; a
    device such as /dev/zero never ends. The file is opened without blocking and its type
    checked on the open descriptor, so one swapped for a FIFO after the check is refused too.
    """
    problem = data_file_problem(path)
    if problem:
        raise DataError(f"{problem}; training data must be regular JSONL files")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DataError(
            f"{path} is {file_kind(mode)}, not a regular file; training data must be regular "
            "JSONL files"
        )
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def bounded_lines(handle: BinaryIO, path: Path, limit_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for each line, never holding more than ``limit_bytes`` + 1 of one:
    a longer record is refused by file and line, before it can take the Mac's memory."""
    number = 0
    while True:
        line = handle.readline(limit_bytes + 1)
        if not line:
            return
        number += 1
        if len(line) > limit_bytes and not (len(line) == limit_bytes + 1 and line[-1:] == b"\n"):
            raise DataError(
                f"{path}:{number}: record is over {limit_bytes // MB} MB (max_record_mb); one "
                "JSONL line is one sample. Split it, or raise max_record_mb if it is one"
            )
        yield number, line


def read_jsonl(
    path: Path, cfg: JobConfig, progress: Callable[[], None] | None = None
) -> list[dict]:
    """Parse a JSONL file, checking that every line is a sample of the first line's format.

    ``progress`` is called every few thousand lines: the trainer's sign of life while loading.
    """
    samples: list[dict] = []
    expected: str | None = None
    with open_data_file(path) as handle:
        for number, raw in bounded_lines(handle, path, cfg.max_record_mb * MB):
            if progress is not None and number % PROGRESS_EVERY == 0:
                progress()
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not UTF-8 text ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON: {json_error_words(exc)}") from None
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
                raise DataError(f"{path}:{number}: each message needs a 'role' and a 'content'")


class TokenizedDataset:
    """Samples tokenized once: ``(tokens, offset)`` per index, tokens as int32 arrays.

    What mlx-lm's ``CacheDataset`` holds after one full pass, at 4 bytes a token instead of a
    list of Python ints (~36), plus each sample's token length for length-sorted batching.
    """

    def __init__(self, samples: list[tuple[np.ndarray, int]]):
        self._samples = samples
        self.lengths = np.array([len(tokens) for tokens, _ in samples], dtype=np.int64)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self._samples[index]

    def __len__(self) -> int:
        return len(self._samples)

    def itemlen(self, index: int) -> int:
        return int(self.lengths[index])


def tokenize(
    raw, where: Callable[[int], str], progress: Callable[[], None] | None = None
) -> TokenizedDataset:
    """Run an mlx-lm dataset's own ``process`` over every sample; ``where(i)`` names sample i.
    ``progress`` is called every few thousand samples (a sign of life while loading)."""
    samples = []
    for index in range(len(raw)):
        if progress is not None and index % PROGRESS_EVERY == PROGRESS_EVERY - 1:
            progress()
        try:
            tokens, offset = raw.process(raw[index])
        except Exception as exc:  # the tokenizer or a chat template may raise anything
            raise DataError(f"{where(index)}: cannot tokenize sample: {exc}") from None
        if len(tokens) < 2:
            raise DataError(f"{where(index)}: sample has fewer than 2 tokens")
        samples.append((np.asarray(tokens, dtype=np.int32), int(offset)))
    return TokenizedDataset(samples)


@dataclass
class Datasets:
    train: TokenizedDataset
    valid: TokenizedDataset | None
    test: TokenizedDataset | None
    source: str  # what was loaded, for messages: a folder or Hugging Face dataset names


def uses_hub_data(cfg: JobConfig) -> bool:
    """Whether the data comes from the Hugging Face Hub rather than a local folder.

    The config resolves a local path to an absolute one and keeps a Hub id as written.
    """
    return cfg.hf_dataset is not None or not Path(cfg.data).is_absolute()


def load_datasets(
    cfg: JobConfig,
    tokenizer,
    *,
    hub_online: bool = True,
    progress: Callable[[], None] | None = None,
    only_test: bool = False,
) -> Datasets:
    """Load and tokenize train/valid (and test when ``cfg.test``) from a folder or the Hub.

    ``progress`` is called as lines are read and samples tokenized: how the supervisor tells
    a long load from a stuck one.
    """
    datasets = (
        _load_hub(cfg, tokenizer, hub_online, progress)
        if uses_hub_data(cfg)
        else _load_local(cfg, tokenizer, progress, only_test)
    )
    if only_test:  # `--test` without training: the test set alone matters
        return datasets
    if len(datasets.train) < cfg.batch_size:
        raise DataError(
            f"{datasets.source}: {len(datasets.train)} training samples, fewer than "
            f"batch_size {cfg.batch_size}"
        )
    return datasets


def _load_local(
    cfg: JobConfig, tokenizer, progress: Callable[[], None] | None, only_test: bool = False
) -> Datasets:
    folder = Path(cfg.data)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist (expected train.jsonl in it)")
    options = types.SimpleNamespace(**cfg.to_dict())
    splits: dict[str, TokenizedDataset | None] = {}
    splits_needed = ("train", "valid", "test") if cfg.test else ("train", "valid")
    if only_test:
        splits_needed = ("test",)
    for split in ("train", "valid", "test"):
        path = folder / f"{split}.jsonl"
        if split not in splits_needed or not os.path.lexists(path):
            splits[split] = None
            continue
        samples = read_jsonl(path, cfg, progress)
        if not samples:
            splits[split] = None
            continue
        try:
            raw = create_dataset(samples, tokenizer, options)
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from None
        splits[split] = tokenize(raw, lambda index, path=path: f"{path}:{index + 1}", progress)
    if splits["train"] is None and not only_test:
        raise DataError(f"{folder / 'train.jsonl'}: missing or empty; a training set is needed")
    if cfg.test and splits["test"] is None:
        raise DataError(f"{folder / 'test.jsonl'}: missing or empty; 'test: true' needs it")
    train = splits["train"] if splits["train"] is not None else TokenizedDataset([])
    return Datasets(train, splits["valid"], splits["test"], str(folder / "train.jsonl"))


def hub_dataset_names(cfg: JobConfig) -> list[str]:
    if cfg.hf_dataset is None:
        return [cfg.data]
    entries = cfg.hf_dataset if isinstance(cfg.hf_dataset, list) else [cfg.hf_dataset]
    return [entry["path"] for entry in entries]


def _load_hub(
    cfg: JobConfig, tokenizer, hub_online: bool, progress: Callable[[], None] | None
) -> Datasets:
    """mlx-lm's own ``load_dataset``: ``data: org/name`` or the ``hf_dataset`` entries."""
    try:
        import datasets as hf_datasets
    except ImportError:
        raise DataError(
            "loading a Hugging Face dataset needs the 'datasets' package; pip install datasets"
        ) from None
    from mlx_lm.tuner.datasets import load_dataset

    # Progress bars are for a terminal; under the supervisor they would fill the stderr tail
    # it keeps for diagnosing crashes.
    hf_datasets.disable_progress_bars()
    names = ", ".join(hub_dataset_names(cfg))
    # mlx-lm writes mask_prompt into each hf_dataset entry; to_dict() is a deep copy.
    args = types.SimpleNamespace(**cfg.to_dict())
    try:
        raw = load_dataset(args, tokenizer)
    except Exception as exc:  # datasets and the Hub raise many types; all mean "cannot load"
        reason = f"{type(exc).__name__}: {exc}".strip()
        if not hub_online:
            reason = (
                "the Hugging Face Hub cannot be reached from here and the dataset is not in "
                f"the local cache ({hf_datasets.config.HF_DATASETS_CACHE}); {reason}"
            )
        raise DataError(f"cannot load Hugging Face dataset {names}: {reason}") from None
    splits: dict[str, TokenizedDataset | None] = {}
    for split, part in zip(("train", "valid", "test"), raw, strict=True):
        if split == "test" and not cfg.test:
            part = []
        splits[split] = (
            tokenize(
                part,
                lambda index, split=split: f"{names} ({split} split) sample {index}",
                progress,
            )
            if len(part)
            else None
        )
    if splits["train"] is None:
        raise DataError(f"{names}: the training split is empty")
    return Datasets(splits["train"], splits["valid"], splits["test"], names)


class ExampleOrder:
    """Which example comes at every position of the run, across epochs, in mlx-lm's batches.

    Examples sorted by their token length (ties by index) are cut into batches of
    ``batch_size``, so a batch holds examples of about one length and little of it is padding;
    the last few, fewer than a batch, are left out of every epoch, as mlx-lm leaves them out.
    (mlx-lm 0.32.2's ``iterate_batches`` means to sort too, but sorts by the length of the raw
    record, a one-key dict for text and chat data, so its batches are effectively unsorted:
    on the varlen preset 46.5% of its batch tokens were real, against loractl's 87%.)
    Epoch e visits the batches in an order shuffled by (seed, e) alone and lays them end to
    end, so position p of the run is the (p % L)-th entry of epoch p // L's sequence, L being
    ``epoch_length``. Resuming from "examples seen" therefore needs no saved iterator, and
    does not care how the positions are grouped into micro-batches or optimizer steps: an
    accumulation change consumes the same batches.

    ``batch_size`` here is the job's submitted batch size, kept for the whole run (the
    checkpoint records it). A ladder rung that lowers the batch size to b takes b consecutive
    positions at a time: when b divides the submitted size, each of its micro-batches is part
    of one length-sorted batch, and otherwise one straddles two, still without repeating or
    skipping a position.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        lengths = np.asarray(lengths)
        if len(lengths) < batch_size:
            raise ValueError(f"{len(lengths)} examples, fewer than batch_size {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        count = len(lengths) // batch_size
        by_length = np.argsort(lengths, kind="stable")
        self.batches = by_length[: count * batch_size].reshape(count, batch_size)
        self.epoch_length = count * batch_size
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s examples in order: its shuffled batches, end to end."""
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.batches))
            self._cache = {epoch: self.batches[order].reshape(-1)}
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.epoch_length)
            out.append(int(self.permutation(epoch)[offset]))
        return out


def padded_width(longest, max_seq_length: int):
    """The length ``make_batch`` pads a batch to when its longest sample, already truncated
    to ``max_seq_length``, has ``longest`` tokens (an int, or a numpy array of them)."""
    return np.minimum(
        1 + PAD_MULTIPLE * ((longest + PAD_MULTIPLE - 1) // PAD_MULTIPLE), max_seq_length
    )


def make_batch(
    dataset: TokenizedDataset, indices: Sequence[int], max_seq_length: int
) -> tuple[mx.array, mx.array]:
    """Pad samples into one batch the way mlx-lm does, returning (tokens, [offset, length])."""
    samples = [dataset[i] for i in indices]
    lengths = [min(len(tokens), max_seq_length) for tokens, _ in samples]
    width = int(padded_width(max(lengths), max_seq_length))
    tokens = np.zeros((len(samples), width), np.int32)
    for row, ((sample, _), length) in enumerate(zip(samples, lengths, strict=True)):
        tokens[row, :length] = sample[:length]
    offsets = [offset for _, offset in samples]
    return mx.array(tokens), mx.array(list(zip(offsets, lengths, strict=True)))


def rank_share(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's part of a global batch: every world_size-th example from its rank on.

    mlx-lm's ``iterate_batches`` slices each length-sorted batch the same way
    (``idx[i + rank : i + batch_size : world_size]``), so the ranks' shares are alike in length.
    """
    return list(indices[rank::world_size])


def eval_batches(
    dataset: TokenizedDataset,
    batch_size: int,
    num_batches: int,
    max_seq_length: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
):
    """Validation batches as mlx-lm makes them (length-sorted, shuffled), the same every time;
    with several ranks, this rank's share of each.

    mlx-lm draws the batch order afresh at each evaluation; a fixed one makes every
    evaluation of the run compare like with like, and a resumed run's match the original's.
    """
    if len(dataset) < batch_size:
        return
    order = ExampleOrder(dataset.lengths, batch_size, seed).permutation(0)
    total = len(order) // batch_size
    if num_batches != -1:
        total = min(total, num_batches)
    for b in range(total):
        batch = order[b * batch_size : (b + 1) * batch_size]
        yield make_batch(dataset, rank_share(batch, rank, world_size), max_seq_length)
