"""The tiny-model builder: offline loading, tokenizer, determinism, data formats, job.yaml."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from loractl.daemon import tinymodel
from loractl.daemon.tinymodel import PRESETS, build_dataset, build_model, prepare

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module", autouse=True)
def _offline():
    # Module scope, so it is in place before the module-scoped load below; any attempt to reach
    # the Hugging Face hub then fails fast instead of hanging or downloading.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict[str, Path]:
    return prepare(tmp_path_factory.mktemp("job"), "tiny", seed=0)


@pytest.fixture(scope="module")
def loaded(job):
    from mlx_lm import load

    return load(str(job["model"]))


def _digests(root: Path) -> dict[str, str]:
    # job.yaml names its folder (absolute paths, so it works once copied to the inbox);
    # with the folder taken out, it too must be identical.
    folder = str(root.resolve()).encode()
    return {
        str(p.relative_to(root)): hashlib.sha256(
            p.read_bytes().replace(folder, b"<folder>") if p.name == "job.yaml" else p.read_bytes()
        ).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_mlx_lm_loads_model_offline_and_forward_has_vocab_logits(loaded):
    """mlx_lm.load reads the built model offline; forward and generate run at the preset vocab."""
    import mlx.core as mx
    from mlx_lm import generate

    model, tokenizer = loaded
    ids = tokenizer.encode("The quiet river")
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), TINY.vocab_size)
    assert bool(mx.all(mx.isfinite(logits)).item())
    assert len(model.layers) == TINY.num_hidden_layers
    text = generate(model, tokenizer, "The quiet", max_tokens=4)
    assert isinstance(text, str)


def test_lora_step_runs_on_tiny_model(job):
    """mlx-lm's LoRA conversion and loss work on the model; the loss starts near ln(vocab)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    # A fresh copy: LoRA conversion mutates the model, which the shared fixture must not see.
    model, tokenizer = load(str(job["model"]))
    model.freeze()
    linear_to_lora_layers(model, TINY.num_hidden_layers, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    text = _read_jsonl(job["data"] / "train.jsonl")[0]["text"]
    ids = tokenizer.encode(text)[:256]
    assert len(ids) == 256
    batch, lengths = mx.array([ids]), mx.array([[0, len(ids)]])
    opt = optim.AdamW(learning_rate=1e-4)
    (loss, ntoks), grads = nn.value_and_grad(model, default_loss)(model, batch, lengths)
    opt.update(model, grads)
    mx.eval(model.parameters(), opt.state)
    assert ntoks.item() == 255
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 1.0


def test_tokenizer_round_trips_and_has_chat_template(loaded):
    """The tokenizer round-trips text, has bos/eos/pad, and applies its chat template."""
    _, tokenizer = loaded
    text = "Ada found a golden lantern near the harbor, then smiled: 42 ü!"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.eos_token == "</s>"
    assert tokenizer.eos_token_id is not None
    assert tokenizer.eos_token_id in tokenizer.eos_token_ids
    assert tokenizer.pad_token_id is not None
    assert len(tokenizer.vocab) == TINY.vocab_size

    messages = [
        {"role": "user", "content": "Tell a story."},
        {"role": "assistant", "content": "Once upon a time."},
    ]
    full = tokenizer.apply_chat_template(messages, return_dict=False)
    prompt = tokenizer.apply_chat_template(
        messages[:1], add_generation_prompt=True, return_dict=False
    )
    assert full[: len(prompt)] == prompt
    assert full.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(prompt) == "<s><|user|>\nTell a story.</s>\n<|assistant|>\n"
    assert tokenizer.eos_token_id in full[len(prompt) :]


def _cli_build(out: Path, seed: int, hashseed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    subprocess.run(
        [sys.executable, "-m", "loractl.daemon.tinymodel", str(out), "--seed", str(seed)],
        check=True,
        env=env,
        capture_output=True,
    )


def test_same_seed_is_byte_identical_across_processes(tmp_path, job):
    """Two separate processes with the same (preset, seed) write byte-identical files."""
    _cli_build(tmp_path / "a", 0, "1")
    _cli_build(tmp_path / "b", 0, "2")
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert "model/model.safetensors" in a and "data/train.jsonl" in a and "job.yaml" in a
    assert a == b
    # The in-process build of the fixture agrees with the command line too.
    assert _digests(job["config"].parent) == a


def test_different_seed_changes_weights_and_data(tmp_path, job):
    """A different seed gives different weights and data but the preset's same tokenizer."""
    other = build_model(tmp_path / "model", "tiny", seed=1)
    data = build_dataset(tmp_path / "data", "tiny", seed=1)
    ours = job["model"]
    assert (other / "model.safetensors").read_bytes() != (ours / "model.safetensors").read_bytes()
    assert (data / "train.jsonl").read_bytes() != (job["data"] / "train.jsonl").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (ours / "tokenizer.json").read_bytes()
    assert (other / "config.json").read_bytes() == (ours / "config.json").read_bytes()


@pytest.mark.parametrize(
    ("fmt", "keys", "cls"),
    [
        ("text", {"text"}, "TextDataset"),
        ("completions", {"prompt", "completion"}, "CompletionsDataset"),
        ("chat", {"messages"}, "ChatDataset"),
    ],
)
def test_dataset_formats_load_in_mlx_lm(tmp_path, loaded, fmt, keys, cls):
    """Each format is valid JSONL that mlx-lm's loader accepts; most samples exceed 256 tokens."""
    from mlx_lm.tuner.datasets import load_local_dataset

    _, tokenizer = loaded
    out = build_dataset(tmp_path, "tiny", seed=0, fmt=fmt)
    sizes = {"train": TINY.n_train, "valid": TINY.n_valid, "test": TINY.n_valid}
    for split, n in sizes.items():
        rows = _read_jsonl(out / f"{split}.jsonl")
        assert len(rows) == n
        assert all(set(r) == keys for r in rows)
    if fmt == "chat":
        roles = [[m["role"] for m in r["messages"]] for r in rows]
        assert all(r == ["user", "assistant"] for r in roles)

    # mask_prompt exercises the generation-prompt path for the chat-based formats.
    config = types.SimpleNamespace(mask_prompt=fmt != "text")
    train, valid, test = load_local_dataset(out, tokenizer, config)
    assert type(train).__name__ == cls
    assert (len(train), len(valid), len(test)) == tuple(sizes.values())
    processed = [train.process(train[i]) for i in range(len(train))]
    lengths = [len(tokens) for tokens, _ in processed]
    assert sum(n > 256 for n in lengths) >= 0.9 * len(lengths)
    assert all(0 <= offset < n for (_, offset), n in zip(processed, lengths, strict=True))


def test_prepare_writes_job_yaml_with_absolute_paths(job):
    """prepare's job.yaml is an mlx_lm.lora-style config whose paths are absolute, so it
    still works once copied into the inbox."""
    from mlx_lm.tuner.utils import build_schedule

    config_path = job["config"]
    cfg = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    root = config_path.parent.resolve()
    assert cfg["model"] == str(root / "model") and cfg["data"] == str(root / "data")
    assert (root / cfg["model"]).resolve() == job["model"].resolve()
    assert (root / cfg["data"]).resolve() == job["data"].resolve()
    assert (root / cfg["model"] / "config.json").is_file()
    assert (root / cfg["data"] / "train.jsonl").is_file()
    assert "learning_rate: 1.0e-4" in config_path.read_text(encoding="utf-8")
    assert cfg["learning_rate"] == pytest.approx(1e-4)
    assert cfg["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.1}
    expected = {
        "fine_tune_type": "lora",
        "optimizer": "adamw",
        "num_layers": -1,
        "batch_size": 1,
        "iters": TINY.iters,
        "max_seq_length": 256,
        "grad_accumulation_steps": 4,
        "val_batches": 2,
        "seed": 0,
        "adapter_path": str(root / "adapters"),
        "checkpoint_every": 2,
        "keep_checkpoints": 3,
    }
    assert {k: cfg[k] for k in expected} == expected
    assert isinstance(cfg["name"], str) and isinstance(cfg["steps_per_eval"], int)
    schedule = build_schedule(cfg["lr_schedule"])
    assert float(schedule(0)) == pytest.approx(1e-4)


def test_ladder_preset_shapes_without_training(tmp_path):
    """The ladder preset builds a full-vocabulary model whose weights match mlx-lm's llama."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    ladder = PRESETS["ladder"]
    assert ladder.hidden_size % ladder.num_attention_heads == 0
    assert ladder.num_attention_heads % ladder.num_key_value_heads == 0
    out = build_model(tmp_path, "ladder", seed=0)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == 8192 and config["max_position_embeddings"] >= 512
    # A tokenizer smaller than the model's vocabulary would decode sampled ids as garbage.
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == 8192
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert shapes == tinymodel._parameter_shapes(config)
    assert shapes["model.embed_tokens.weight"] == (8192, ladder.hidden_size)
    assert sum(".mlp.down_proj." in name for name in shapes) == ladder.num_hidden_layers


def test_unknown_preset_and_format_are_rejected(tmp_path):
    """Typos in the preset or the format raise ValueError naming the valid choices."""
    with pytest.raises(ValueError, match="ladder"):
        build_model(tmp_path, "huge")
    with pytest.raises(ValueError, match="completions"):
        build_dataset(tmp_path, "tiny", fmt="alpaca")


def test_varlen_preset_spreads_lengths_for_batch_4(tmp_path):
    """The varlen preset's samples run from about 16 to 512 tokens, its job batches 4 at 512."""
    from mlx_lm import load

    paths = prepare(tmp_path, "varlen", seed=0)
    _, tokenizer = load(str(paths["model"]))
    lengths = sorted(
        len(tokenizer.encode(row["text"])) for row in _read_jsonl(paths["data"] / "train.jsonl")
    )
    assert len(lengths) == PRESETS["varlen"].n_train
    assert lengths[0] <= 24 and lengths[-1] >= 400 and lengths[-1] <= 512
    # Log-uniform: as many samples under the geometric middle (~90 tokens) as over it.
    assert 0.3 < sum(n < 90 for n in lengths) / len(lengths) < 0.7
    cfg = yaml.safe_load(paths["config"].read_text())
    assert (cfg["batch_size"], cfg["grad_accumulation_steps"], cfg["max_seq_length"]) == (4, 1, 512)


def test_moe_preset_is_a_mixtral_with_switch_experts(tmp_path):
    """The moe preset loads in mlx-lm as Mixtral whose experts are SwitchGLU layers."""
    from mlx_lm import load
    from mlx_lm.models.switch_layers import SwitchGLU

    out = build_model(tmp_path, "moe", seed=0)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    model, _ = load(str(out))
    assert all(isinstance(layer.block_sparse_moe.switch_mlp, SwitchGLU) for layer in model.layers)
    assert tuple(model.layers[0].block_sparse_moe.switch_mlp.up_proj.weight.shape) == (4, 64, 32)
