"""Tests for dataset validation and the resumable example order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loractl.config import parse_config
from loractl.daemon.data import DataError, ExampleOrder, read_jsonl


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    return parse_config({"model": "model", "data": "data"}, tmp_path)


def test_each_epoch_is_a_permutation():
    """Every epoch visits every example exactly once."""
    order = ExampleOrder(10, seed=3)
    for epoch in range(3):
        assert sorted(order.indices(epoch * 10, 10)) == list(range(10))


def test_order_is_independent_of_how_it_is_sliced():
    """Consuming in batches of 1, 3 or 7 from any start gives the same sequence."""
    whole = ExampleOrder(13, seed=5).indices(0, 60)
    for size in (1, 3, 7):
        order = ExampleOrder(13, seed=5)
        pieces = []
        position = 0
        while position < 60:
            count = min(size, 60 - position)
            pieces.extend(order.indices(position, count))
            position += count
        assert pieces == whole


def test_order_depends_on_the_seed():
    """Two seeds give two orders."""
    assert ExampleOrder(50, 1).indices(0, 50) != ExampleOrder(50, 2).indices(0, 50)
    order = ExampleOrder(50, 1)
    assert not np.array_equal(order.permutation(0), order.permutation(1))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "ok"}', '{"text": "fine"', '{"text": "x"}'], ":2: invalid JSON"),
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
