"""Tests for dataset validation and the resumable example order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loractl.config import parse_config
from loractl.daemon.data import DataError, ExampleOrder, json_error_words, read_jsonl, tokenize
from loractl.daemon.trainer import StoppedBeforeTraining


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    return parse_config({"model": "model", "data": "data"}, tmp_path)


def spread_lengths(n: int = 200, seed: int = 7) -> np.ndarray:
    """Token lengths spread 32-2048, as in DESIGN.md's padding measurement."""
    return np.random.default_rng(seed).integers(32, 2049, size=n)


def real_token_fraction(lengths, batches) -> float:
    """Real tokens over padded tokens, for batches padded to their longest sample."""
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return real / padded


def test_each_epoch_visits_every_batch_once_leaving_out_the_longest_remainder():
    """An epoch is every example but the len % batch_size longest, as mlx-lm leaves them out."""
    lengths = spread_lengths(n=50)
    order = ExampleOrder(lengths, batch_size=4, seed=3)
    assert order.epoch_length == 48
    left_out = set(range(50)) - set(order.permutation(0).tolist())
    assert len(left_out) == 2 and min(lengths[list(left_out)]) >= np.sort(lengths)[-3]
    for epoch in range(3):
        positions = order.indices(epoch * 48, 48)
        assert sorted(positions) == sorted(order.permutation(0).tolist())


def test_batches_are_length_sorted_and_shuffled_per_epoch():
    """Each aligned batch holds neighbours in length; the batch order differs by epoch."""
    lengths = spread_lengths()
    order = ExampleOrder(lengths, batch_size=4, seed=1)
    ranks = np.empty(len(lengths), dtype=int)
    ranks[np.argsort(lengths, kind="stable")] = np.arange(len(lengths))
    for epoch in range(2):
        batches = order.permutation(epoch).reshape(-1, 4)
        for batch in batches:
            assert sorted(ranks[batch]) == list(range(ranks[batch].min(), ranks[batch].min() + 4))
    assert not np.array_equal(order.permutation(0), order.permutation(1))


def test_sorted_batches_waste_little_padding():
    """Batch 4, lengths 32-2048: ~98% real tokens sorted, against ~64% for random batches."""
    lengths = spread_lengths(n=1000)
    sorted_batches = ExampleOrder(lengths, batch_size=4, seed=0).permutation(0).reshape(-1, 4)
    random_batches = np.random.default_rng(0).permutation(1000).reshape(-1, 4)
    assert real_token_fraction(lengths, sorted_batches) > 0.97
    assert real_token_fraction(lengths, random_batches) < 0.75


def test_order_is_independent_of_how_it_is_sliced():
    """Consuming in micro-batches of 1, 2, 3 or 7 from any start gives the same sequence.

    So an accumulation change, or a rung that lowers the batch size, consumes the same
    examples in the same order: none repeated, none skipped."""
    lengths = spread_lengths(n=26)
    whole = ExampleOrder(lengths, 4, seed=5).indices(0, 100)
    for size in (1, 2, 3, 7):
        order = ExampleOrder(lengths, 4, seed=5)
        pieces = []
        position = 0
        while position < 100:
            count = min(size, 100 - position)
            pieces.extend(order.indices(position, count))
            position += count
        assert pieces == whole


def test_order_depends_on_seed_and_batch_size_only():
    """Two seeds or two batch sizes give two orders; the same ones give the same order."""
    lengths = spread_lengths(n=40)
    first = ExampleOrder(lengths, 4, 1).indices(0, 80)
    assert ExampleOrder(lengths, 4, 1).indices(0, 80) == first
    assert ExampleOrder(lengths, 4, 2).indices(0, 80) != first
    assert ExampleOrder(lengths, 2, 1).indices(0, 80) != first


def test_fewer_examples_than_a_batch_is_refused():
    """An order cannot be cut from fewer examples than one batch."""
    with pytest.raises(ValueError, match="fewer than batch_size 4"):
        ExampleOrder([10, 20, 30], 4, seed=0)


def test_json_errors_are_whole_sentences():
    """A JSON error reads to its column, never stopping at 'Invalid control character at'."""
    cases = {
        '{"text": "a\tb"}': "Invalid control character at column 12",
        '{"text": "ok"': "Expecting ',' delimiter at column 14",
    }
    for line, words in cases.items():
        try:
            json.loads(line)
        except json.JSONDecodeError as exc:
            assert json_error_words(exc) == words
        else:
            raise AssertionError(f"{line!r} parsed")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "ok"}', '{"text": "fine"', '{"text": "x"}'], ":2: invalid JSON: Expecting"),
        (['{"text": "a\tb"}'], ":1: invalid JSON: Invalid control character at column 12"),
        (['{"text": "ok"}', "[1, 2]"], ":2: expected a JSON object"),
        (['{"text": "ok"}', '{"body": "no"}'], ":2: sample has none of the keys"),
        (['{"text": "ok"}', '{"prompt": "p", "completion": "c"}'], ":2: sample is in completions"),
        (['{"text": ""}'], ":1: 'text' must be a non-empty string"),
        (['{"prompt": 3, "completion": "c"}'], ":1: 'prompt' must be a string"),
        (['{"messages": []}'], ":1: 'messages' must be a non-empty list"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, cfg, lines, message):
    """A malformed JSONL line raises DataError naming the file and the line number."""
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path, cfg)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_non_utf8_data_is_a_data_error(tmp_path, cfg):
    """Binary garbage in a dataset is reported, not a traceback."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\xff\xfe\x00garbage\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_jsonl(path, cfg)


def test_blank_lines_are_skipped(tmp_path, cfg):
    """Blank lines between samples are tolerated, as mlx-lm users produce them."""
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"text": "b"}) + "\n")
    assert [s["text"] for s in read_jsonl(path, cfg)] == ["a", "b"]


class StoppedWhileTokenizing:
    """A raw dataset whose third sample is where the stop's signal handler raises."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        return index

    def process(self, index: int) -> tuple[list[int], int]:
        if index == 2:
            raise StoppedBeforeTraining()
        return [1, 2, 3], 0


def test_a_stop_while_tokenizing_is_a_stop_not_a_data_error():
    """The tokenizer's catch-all turns its own errors into DataError, never a stop request."""
    with pytest.raises(StoppedBeforeTraining):
        tokenize(StoppedWhileTokenizing(), lambda index: f"train.jsonl:{index + 1}")
