"""Tests for loractl.config: loading, validation, overrides, identity and the ladder."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from loractl.config import (
    LADDER_KEYS,
    MAX_CONFIG_BYTES,
    ConfigError,
    JobConfig,
    LoraParameters,
    default_ladder,
    iter_fields,
    load_config,
    parse_config,
)

# mlx-lm's examples/lora_config.yaml (upstream layout), with the commented optimizer_config and
# lr_schedule blocks switched on. Only model and data are pointed at folders the test makes.
MLX_EXAMPLE_YAML = """\
# The path to the local model directory or Hugging Face repo.
model: "mlx_model"

# Whether or not to train (boolean)
train: true

# The fine-tuning method: "lora", "dora", or "full".
fine_tune_type: lora

# The Optimizer with its possible inputs
optimizer: adamw
optimizer_config:
  adamw:
    betas: [0.9, 0.98]
    eps: 1e-6
    weight_decay: 0.05
    bias_correction: true

# Directory with {train, valid, test}.jsonl files
data: "data"

# The PRNG seed
seed: 0

# Number of layers to fine-tune
num_layers: 16

# Minibatch size.
batch_size: 4

# Iterations to train for.
iters: 1000

# Number of validation batches, -1 uses the entire validation set.
val_batches: 25

# Adam learning rate.
learning_rate: 1e-5

# Services to report logs to (comma-separated): wandb, swanlab, or both ('wandb,swanlab').
# report_to: wandb,swanlab
# project_name: "Your-awesome-mlx-project-name"

# Number of training steps between loss reporting.
steps_per_report: 10

# Number of training steps between validations.
steps_per_eval: 200

# Number of micro-steps to accumulate before each optimizer update.
grad_accumulation_steps: 1

# Load path to resume training with the given adapter weights.
resume_adapter_file: null

# Save/load path for the trained adapter weights.
adapter_path: "adapters"

# Save the model every N iterations.
save_every: 100

# Evaluate on the test set after training
test: false

# Number of test set batches, -1 uses the entire test set.
test_batches: 100

# Maximum sequence length.
max_seq_length: 2048

# Use gradient checkpointing to reduce memory use.
grad_checkpoint: false

# LoRA parameters can only be specified in a config file
lora_parameters:
  # The layer keys to apply LoRA to.
  # These will be applied for the last lora_layers
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.0

# Schedule can only be specified in a config file, uncomment to use.
lr_schedule:
  name: cosine_decay
  warmup: 100 # 0 for no warmup
  warmup_init: 1e-7 # 0 if not specified
  arguments: [1e-5, 1000, 1e-7] # passed to scheduler
"""

MLX_EXAMPLE_TOML = """\
model = "mlx_model"
train = true
fine_tune_type = "lora"
optimizer = "adamw"
data = "data"
seed = 0
num_layers = 16
batch_size = 4
iters = 1000
val_batches = 25
learning_rate = 1e-5
steps_per_report = 10
steps_per_eval = 200
grad_accumulation_steps = 1
adapter_path = "adapters"
save_every = 100
test = false
test_batches = 100
max_seq_length = 2048
grad_checkpoint = false

[optimizer_config.adamw]
betas = [0.9, 0.98]
eps = 1e-6
weight_decay = 0.05
bias_correction = true

[lora_parameters]
keys = ["self_attn.q_proj", "self_attn.v_proj"]
rank = 8
scale = 20.0
dropout = 0.0

[lr_schedule]
name = "cosine_decay"
warmup = 100
warmup_init = 1e-7
arguments = [1e-5, 1000, 1e-7]
"""


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    """A folder holding a fake local model and dataset, as relative paths 'model', 'data'."""
    for name in ("model", "data", "mlx_model"):
        (tmp_path / name).mkdir()
    return tmp_path


def write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def minimal(job_dir: Path, **extra) -> JobConfig:
    return parse_config({"model": "model", "data": "data", **extra}, job_dir)


# --- a real mlx-lm config --------------------------------------------------------------------


def test_mlx_lm_example_yaml_loads_unchanged(job_dir):
    """mlx-lm's own example config loads as written, with 1e-5 read as a float as mlx-lm does."""
    cfg = load_config(write(job_dir, "job.yaml", MLX_EXAMPLE_YAML))
    assert cfg.model == str(job_dir / "mlx_model")
    assert cfg.data == str(job_dir / "data")
    assert cfg.adapter_path == str(job_dir / "adapters")
    assert cfg.name == "job"
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate == 1e-5
    assert cfg.optimizer == "adamw"
    assert cfg.optimizer_config == {
        "adamw": {"betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.05, "bias_correction": True}
    }
    assert cfg.lora_parameters == LoraParameters(
        rank=8, scale=20.0, dropout=0.0, keys=["self_attn.q_proj", "self_attn.v_proj"]
    )
    assert cfg.lr_schedule == {
        "name": "cosine_decay",
        "warmup": 100,
        "warmup_init": 1e-7,
        "arguments": [1e-5, 1000, 1e-7],
    }
    assert (cfg.test_batches, cfg.max_seq_length, cfg.resume_adapter_file) == (100, 2048, None)
    args = cfg.mlx_lm_args()
    assert args["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert "ladder" not in args and "name" not in args
    json.dumps(args, allow_nan=False)


def test_toml_and_json_load_equal_to_yaml(job_dir):
    """The same config written as TOML and as JSON loads to an equal JobConfig."""
    from_yaml = load_config(write(job_dir, "job.yaml", MLX_EXAMPLE_YAML))
    from_toml = load_config(write(job_dir, "job.toml", MLX_EXAMPLE_TOML))
    from_json = load_config(write(job_dir, "job.json", json.dumps(tomllib.loads(MLX_EXAMPLE_TOML))))
    assert from_toml == from_yaml
    assert from_json == from_yaml
    assert from_toml.identity_hash() == from_yaml.identity_hash() == from_json.identity_hash()


def _mlx_lm_source() -> str:
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mlx_lm is not installed")
    return (Path(spec.submodule_search_locations[0]) / "lora.py").read_text()


def _mlx_config_defaults() -> dict:
    for node in ast.walk(ast.parse(_mlx_lm_source())):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "CONFIG_DEFAULTS" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("CONFIG_DEFAULTS not found in mlx_lm/lora.py")


def test_defaults_match_mlx_lm(job_dir):
    """Every mlx_lm.lora default (read from its source, without importing mlx) is ours too."""
    mlx_defaults = _mlx_config_defaults()
    cfg = minimal(job_dir)
    ours = cfg.mlx_lm_args()
    # mlx-lm's model/data defaults are demo values, train defaults off because its CLI also
    # evaluates; optimizer_config lists every optimizer with {} which means the same as {}.
    skip = {"model", "data", "train", "config", "optimizer_config", "adapter_path"}
    for key, value in mlx_defaults.items():
        if key not in skip:
            assert ours[key] == value, key
    assert cfg.adapter_path == str(job_dir / mlx_defaults["adapter_path"])
    assert set(mlx_defaults) - {"config"} <= set(cfg.mlx_lm_args())


def test_every_mlx_lm_cli_option_is_a_field():
    """Each --option mlx_lm.lora's parser knows is a JobConfig field of the same name."""
    options = set()
    for node in ast.walk(ast.parse(_mlx_lm_source())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
                    options.add(arg.value[2:].replace("-", "_"))
    names = {f.name for f in dataclasses.fields(JobConfig)}
    assert options, "no options parsed"
    assert options - {"config"} <= names


# --- malformed configs ---------------------------------------------------------------------

BASE = "model: model\ndata: data\n"

MALFORMED = [
    pytest.param("job.yaml", BASE + "batch_size: [1, 2\n", "YAML error", 4, id="yaml-syntax"),
    pytest.param(
        "job.yaml", BASE + "lora_parameters:\n\trank: 4\n", "tabs", 4, id="tab-indentation"
    ),
    pytest.param(
        "job.yaml",
        BASE + "learnig_rate: 1e-4\n",
        "unknown key 'learnig_rate' (did you mean 'learning_rate'?)",
        None,
        id="unknown-key-suggestion",
    ),
    pytest.param(
        "job.yaml",
        BASE + "lora_parameters:\n  rnak: 4\n",
        "unknown key 'lora_parameters.rnak' (did you mean 'rank'?)",
        None,
        id="unknown-lora-subkey",
    ),
    pytest.param(
        "job.yaml",
        BASE + "lora_parameters:\n  rank: 8\n  alpha: 16\n",
        "'lora_parameters.alpha' (mlx-lm's LoRA config uses 'scale'",
        None,
        id="alpha-hint",
    ),
    pytest.param(
        "job.yaml",
        BASE + "rank: 4\n",
        "unknown key 'rank' (it belongs under 'lora_parameters')",
        None,
        id="lora-key-at-top-level",
    ),
    pytest.param(
        "job.yaml",
        BASE + "lora_layers: 8\n",
        "renamed it 'num_layers'",
        None,
        id="old-mlx-lm-key",
    ),
    pytest.param(
        "job.yaml",
        BASE + "batch_size: '4'\n",
        "key 'batch_size': expected an integer >= 1, got '4'",
        None,
        id="int-as-string",
    ),
    pytest.param(
        "job.yaml",
        BASE + "batch_size: 2.5\n",
        "key 'batch_size': expected an integer >= 1, got 2.5",
        None,
        id="float-for-int",
    ),
    pytest.param(
        "job.yaml",
        BASE + "learning_rate: fast\n",
        "key 'learning_rate': expected a finite number > 0, got 'fast'",
        None,
        id="float-as-string",
    ),
    pytest.param(
        "job.yaml",
        BASE + "grad_checkpoint: maybe\n",
        "key 'grad_checkpoint': expected true or false, got 'maybe'",
        None,
        id="bool-as-string",
    ),
    pytest.param(
        "job.yaml",
        BASE + "prompt_feature: 3\n",
        "key 'prompt_feature': expected a non-empty string, got 3",
        None,
        id="int-for-str",
    ),
    pytest.param(
        "job.yaml",
        BASE + "lora_parameters:\n  keys: self_attn.q_proj\n",
        "key 'lora_parameters.keys': expected null or a non-empty list",
        None,
        id="str-for-list",
    ),
    pytest.param(
        "job.yaml",
        BASE + "iters: -3\n",
        "key 'iters': expected an integer >= 1, got -3",
        None,
        id="negative-iters",
    ),
    pytest.param(
        "job.yaml",
        BASE + "batch_size: 0\n",
        "key 'batch_size': expected an integer >= 1, got 0",
        None,
        id="zero-batch-size",
    ),
    pytest.param(
        "job.yaml",
        BASE + "lora_parameters:\n  dropout: 1.5\n",
        "key 'lora_parameters.dropout': expected a finite number >= 0 and < 1, got 1.5",
        None,
        id="dropout-too-big",
    ),
    pytest.param(
        "job.yaml",
        BASE + "batch_size: true\n",
        "key 'batch_size': expected an integer >= 1, got True",
        None,
        id="bool-for-int",
    ),
    pytest.param(
        "job.yaml",
        BASE + "learning_rate: false\n",
        "key 'learning_rate': expected a finite number > 0, got False",
        None,
        id="bool-for-float",
    ),
    pytest.param(
        "job.yaml",
        BASE + "learning_rate: .nan\n",
        "key 'learning_rate': expected a finite number > 0, got nan",
        None,
        id="nan-learning-rate",
    ),
    pytest.param(
        "job.yaml", "data: data\n", "missing required key 'model'", None, id="missing-model"
    ),
    pytest.param(
        "job.yaml", "model: model\n", "missing required key 'data'", None, id="missing-data"
    ),
    pytest.param(
        "job.yaml",
        "model: ./nowhere\ndata: data\n",
        "key 'model': path",
        None,
        id="model-path-to-nowhere",
    ),
    pytest.param(
        "job.yaml",
        "model: model\ndata: no-such-folder\n",
        "key 'data': path",
        None,
        id="data-path-to-nowhere",
    ),
    pytest.param(
        "job.yaml",
        BASE + "resume_adapter_file: missing.safetensors\n",
        "key 'resume_adapter_file': file",
        None,
        id="resume-file-missing",
    ),
    pytest.param(
        "job.yaml",
        BASE + "ladder:\n  - max_seq_lenght: 128\n",
        "unknown key 'ladder[0].max_seq_lenght' (did you mean 'max_seq_length'?)",
        None,
        id="ladder-rung-unknown-key",
    ),
    pytest.param(
        "job.yaml",
        BASE + "ladder:\n  - batch_size: 1\n  - model: other\n",
        "key 'ladder[1].model': 'model' cannot change on a ladder rung",
        None,
        id="ladder-rung-non-ladder-key",
    ),
    pytest.param(
        "job.yaml",
        BASE + "ladder:\n  - lora_parameters: {scale: 10.0}\n",
        "key 'ladder[0].lora_parameters.scale': a ladder rung may only change",
        None,
        id="ladder-rung-lora-scale",
    ),
    pytest.param(
        "job.yaml",
        BASE + "ladder:\n  - batch_size: 1\n  - max_seq_length: 0\n",
        "key 'ladder[1].max_seq_length': expected an integer >= 2, got 0",
        None,
        id="ladder-rung-bad-value",
    ),
    pytest.param(
        "job.yaml",
        BASE + "ladder:\n  - {}\n",
        "key 'ladder[0]': expected a non-empty mapping",
        None,
        id="ladder-rung-empty",
    ),
    pytest.param(
        "job.yaml",
        BASE + "ladder: {batch_size: 1}\n",
        "key 'ladder': expected null, 'auto', or a list of rungs",
        None,
        id="ladder-not-a-list",
    ),
    pytest.param("job.yaml", "", "the file is empty", None, id="empty-file"),
    pytest.param("job.yaml", "# only a comment\n", "the file is empty", None, id="only-comments"),
    pytest.param(
        "job.yaml", "- model\n- data\n", "top level must be a mapping", None, id="top-level-list"
    ),
    pytest.param(
        "job.yaml", "just a sentence\n", "top level must be a mapping", None, id="top-level-str"
    ),
    pytest.param(
        "job.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary data", 3, id="binary-garbage"
    ),
    pytest.param("job.yaml", b"model: model\ndata: caf\xe9\n", "not valid UTF-8", 2, id="non-utf8"),
    pytest.param(
        "job.yaml",
        BASE + "#" + "x" * MAX_CONFIG_BYTES + "\n",
        f"limited to {MAX_CONFIG_BYTES}",
        None,
        id="over-1mb",
    ),
    pytest.param(
        "job.ini", BASE, "unsupported config file type '.ini'", None, id="unsupported-suffix"
    ),
    pytest.param("job", BASE, "unsupported config file type", None, id="no-suffix"),
    pytest.param(
        "job.yaml",
        BASE + "lr_schedule:\n  name: cosine_decay\n",
        "missing required key 'lr_schedule.arguments'",
        None,
        id="lr-schedule-missing-arguments",
    ),
    pytest.param(
        "job.yaml",
        BASE + "lr_schedule: {name: cosine_decy, arguments: [1e-5, 100]}\n",
        "key 'lr_schedule.name': expected one of",
        None,
        id="lr-schedule-bad-name",
    ),
    pytest.param(
        "job.yaml",
        BASE + "lr_schedule: {name: linear_schedule, arguments: [1e-5]}\n",
        "key 'lr_schedule.arguments': expected a list of 3 finite numbers",
        None,
        id="lr-schedule-wrong-arity",
    ),
    pytest.param(
        "job.yaml",
        BASE + "lr_schedule: {name: cosine_decay, arguments: [1e-5, 100], decay: 2}\n",
        "unknown key 'lr_schedule.decay'",
        None,
        id="lr-schedule-unknown-subkey",
    ),
    pytest.param(
        "job.yaml",
        BASE + "optimizer: adamx\n",
        "key 'optimizer': expected one of 'adam', 'adamw'",
        None,
        id="bad-optimizer",
    ),
    pytest.param(
        "job.yaml",
        BASE + "optimizer_config:\n  adamx: {eps: 1e-6}\n",
        "unknown key 'optimizer_config.adamx'",
        None,
        id="optimizer-config-unknown-optimizer",
    ),
    pytest.param(
        "job.yaml",
        BASE + "optimizer_config:\n  adamw: {weight_decy: 0.1}\n",
        "unknown key 'optimizer_config.adamw.weight_decy' (did you mean 'weight_decay'?)",
        None,
        id="optimizer-config-unknown-argument",
    ),
    pytest.param(
        "job.yaml",
        BASE + "fine_tune_type: qlora\n",
        "key 'fine_tune_type': expected one of 'lora', 'dora', 'full'",
        None,
        id="bad-fine-tune-type",
    ),
    pytest.param(
        "job.yaml",
        BASE + "heartbeat_interval: 5\nheartbeat_timeout: 5\n",
        "key 'heartbeat_timeout': must be greater than heartbeat_interval",
        None,
        id="heartbeat-timeout-not-above-interval",
    ),
    pytest.param(
        "job.yaml",
        BASE + "name: my job\n",
        "key 'name': expected 1-64 characters",
        None,
        id="name-with-space",
    ),
    pytest.param("job.yaml", BASE + "name: ..\n", "key 'name'", None, id="name-dot-dot"),
    pytest.param(
        "job.yaml",
        BASE + "priority: 101\n",
        "key 'priority': expected an integer from -100 to 100, got 101",
        None,
        id="priority-out-of-range",
    ),
    pytest.param(
        "job.yaml",
        BASE + "memory_budget_mb: 10\n",
        "key 'memory_budget_mb': expected null or an integer >= 64, got 10",
        None,
        id="memory-budget-too-small",
    ),
    pytest.param(
        "job.yaml",
        BASE + "memory_budget_mb: 8192\nmemory_budget_gb: 8\n",
        "both set",
        None,
        id="memory-budget-both-units",
    ),
    pytest.param(
        "job.yaml",
        BASE + "clear_cache_threshold: 2TB\n",
        "key 'clear_cache_threshold'",
        None,
        id="bad-size-string",
    ),
    pytest.param(
        "job.yaml", BASE + "train: false\n", "loractl always trains", None, id="train-false"
    ),
    pytest.param(
        "job.yaml",
        BASE + "batch_size: 2\nbatch_size: 4\n",
        "duplicate key 'batch_size'",
        4,
        id="yaml-duplicate-key",
    ),
    pytest.param("job.yaml", BASE + "1: one\n", "keys must be strings", None, id="int-key"),
    pytest.param(
        "job.yaml",
        BASE + "hf_dataset:\n  name: billsum\n",
        "key 'hf_dataset': missing required key 'path'",
        None,
        id="hf-dataset-without-path",
    ),
    pytest.param(
        "job.yaml",
        BASE + "report_to: wandbb\n",
        "key 'report_to'",
        None,
        id="bad-report-to",
    ),
    pytest.param(
        "job.yaml",
        "model: model\ndata: data\nx: !!python/object/apply:os.getcwd []\n",
        "python/object",
        3,
        id="python-tag",
    ),
    pytest.param("job.toml", 'model = "model"\ndata =\n', "TOML error", 2, id="toml-syntax"),
    pytest.param(
        "job.json", '{"model": "model",\n "data": "data",}', "JSON error", 2, id="json-syntax"
    ),
    pytest.param(
        "job.json",
        '{"model": "model", "data": "data", "model": "x"}',
        "duplicate key 'model'",
        None,
        id="json-duplicate-key",
    ),
    pytest.param(
        "job.json",
        '{"model": "model", "data": "data", "learning_rate": NaN}',
        "key 'learning_rate'",
        None,
        id="json-nan",
    ),
]


@pytest.mark.parametrize(("filename", "content", "expected", "line"), MALFORMED)
def test_malformed_config_is_rejected_with_a_precise_message(
    job_dir, filename, content, expected, line
):
    """Each malformed config raises ConfigError whose one-line message names the problem."""
    path = write(job_dir, filename, content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert expected in message
    assert message.startswith(str(path) + ":")
    assert "\n" not in message
    assert info.value.source == str(path)
    if line is not None:
        assert info.value.line == line


def test_error_key_attribute_names_the_offending_key(job_dir):
    """ConfigError.key carries the dotted/indexed key path for programs, not just the text."""
    cases = {
        "batch_size": {"batch_size": -3},
        "learnig_rate": {"learnig_rate": 1e-4},
        "lora_parameters.alpha": {"lora_parameters": {"alpha": 16}},
        "ladder[2].max_seq_lenght": {
            "ladder": [{"batch_size": 1}, {"batch_size": 1}, {"max_seq_lenght": 64}]
        },
    }
    for key, bad in cases.items():
        with pytest.raises(ConfigError) as info:
            minimal(job_dir, **bad)
        assert info.value.key == key
        assert str(info.value).startswith("<config>: ")


def test_exact_message_format(job_dir):
    """Messages read '<source>: key ...: expected ..., got ...' and values are truncated."""
    path = write(job_dir, "job.yaml", BASE + "batch_size: -3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: key 'batch_size': expected an integer >= 1, got -3"
    with pytest.raises(ConfigError) as info:
        minimal(job_dir, prompt_feature=["x" * 500])
    assert "..." in str(info.value) and len(str(info.value)) < 200


def test_config_error_survives_pickling():
    """A ConfigError sent between processes keeps its key, source and message."""
    err = ConfigError("key 'seed': expected an integer, got 'a'", key="seed", source="job.yaml")
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.key, copy.source) == (str(err), "seed", "job.yaml")


def test_unreadable_paths_are_config_errors(job_dir):
    """A missing file and a directory both give ConfigError, not OSError."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(job_dir / "absent.yaml")
    (job_dir / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(job_dir / "dir.yaml")


def test_python_tag_is_not_executed(job_dir, tmp_path):
    """A !!python/object tag is refused by the safe loader and never runs."""
    marker = tmp_path / "pwned"
    text = BASE + f"x: !!python/object/apply:os.mkdir [{str(marker)!r}]\n"
    with pytest.raises(ConfigError, match="python/object"):
        load_config(write(job_dir, "job.yaml", text))
    assert not marker.exists()


def test_yaml_alias_bomb_is_bounded(job_dir):
    """Exponentially aliased YAML in a free-form key fails fast instead of eating memory."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    text = "model: model\ndata: data\nhf_dataset:\n  path: x\n  config:\n" + "".join(
        "    " + line + "\n" for line in lines
    )
    with pytest.raises(ConfigError, match="too large"):
        load_config(write(job_dir, "job.yaml", text))


# --- paths --------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    """model, data, resume_adapter_file and adapter_path resolve beside the file, not in cwd."""
    (tmp_path / "models" / "m").mkdir(parents=True)
    conf_dir = tmp_path / "jobs"
    (conf_dir / "data").mkdir(parents=True)
    (conf_dir / "start.safetensors").write_bytes(b"")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = (
        "model: ../models/m\ndata: data\nresume_adapter_file: start.safetensors\n"
        "adapter_path: out/adapters\n"
    )
    cfg = load_config(write(conf_dir, "job.yaml", text))
    assert cfg.model == str(tmp_path / "models" / "m")
    assert cfg.data == str(conf_dir / "data")
    assert cfg.resume_adapter_file == str(conf_dir / "start.safetensors")
    assert cfg.adapter_path == str(conf_dir / "out" / "adapters")
    # An override's relative path also lands beside the config, whatever the cwd.
    (conf_dir / "data2").mkdir()
    assert cfg.with_overrides({"data": "data2"}).data == str(conf_dir / "data2")


def test_hub_ids_are_kept_and_local_paths_win(job_dir):
    """'org/name' that is not a local path stays a Hub id; an existing folder becomes absolute."""
    cfg = parse_config({"model": "mlx-community/Qwen3-0.6B-4bit", "data": "org/ds"}, job_dir)
    assert (cfg.model, cfg.data) == ("mlx-community/Qwen3-0.6B-4bit", "org/ds")
    (job_dir / "org" / "ds").mkdir(parents=True)
    assert parse_config({"model": "model", "data": "org/ds"}, job_dir).data == str(
        job_dir / "org" / "ds"
    )
    for not_an_id in ("./org/x", "~/nowhere/x", "../a/b", "a/b/c", "plain-name"):
        with pytest.raises(ConfigError, match="does not exist"):
            parse_config({"model": not_an_id, "data": "data"}, job_dir)


def test_hf_dataset_replaces_data(job_dir):
    """With hf_dataset set, 'data' may be left out, as mlx-lm allows."""
    hf = [{"path": "billsum", "prompt_feature": "text", "completion_feature": "summary"}]
    cfg = parse_config({"model": "model", "hf_dataset": hf}, job_dir)
    assert cfg.data is None and cfg.hf_dataset == hf


# --- every field, round trip ---------------------------------------------------------------


def install_reporters(monkeypatch, folder: Path) -> None:
    """Make 'wandb' and 'swanlab' findable as installed packages (report_to checks for them)."""
    site = folder / "site"
    for name in ("wandb", "swanlab"):
        (site / name).mkdir(parents=True, exist_ok=True)
        (site / name / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))


@pytest.fixture
def reporters(monkeypatch, tmp_path):
    install_reporters(monkeypatch, tmp_path)


def non_default_values(tmp_path: Path) -> dict:
    """A valid, non-default value for every schema field (absolute paths, so they round-trip).

    report_to names wandb: use it with the ``reporters`` fixture."""
    for name in ("m", "d"):
        (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / "start.safetensors").write_bytes(b"")
    return {
        "model": str(tmp_path / "m"),
        "train": True,  # the only value loractl accepts
        "test": True,
        "test_batches": -1,
        "preflight": False,
        "fine_tune_type": "dora",
        "optimizer": "adamw",
        "optimizer_config": {"adamw": {"weight_decay": 0.1, "betas": [0.9, 0.95]}},
        "data": str(tmp_path / "d"),
        "seed": 7,
        "num_layers": -1,
        "batch_size": 1,
        "iters": 600,
        "val_batches": 0,
        "learning_rate": 2e-4,
        "steps_per_report": 5,
        "steps_per_eval": 50,
        "resume_adapter_file": str(tmp_path / "start.safetensors"),
        "adapter_path": str(tmp_path / "out"),
        "save_every": 40,
        "max_seq_length": 256,
        "grad_checkpoint": True,
        "grad_accumulation_steps": 4,
        "clear_cache_threshold": 2_000_000_000,
        "lr_schedule": {
            "name": "cosine_decay",
            "arguments": [2e-4, 600, 1e-6],
            "warmup": 10,
            "warmup_init": 1e-7,
        },
        "lora_parameters": {"rank": 16, "scale": 10.0, "dropout": 0.05, "keys": ["mlp.up_proj"]},
        "mask_prompt": True,
        "report_to": "wandb",
        "project_name": "night",
        "trust_remote_code": True,
        "hf_dataset": {
            "path": "billsum",
            "prompt_feature": "text",
            "config": {"k": [1, 2]},
            "test_split": "test",
        },
        "prompt_feature": "input",
        "completion_feature": "output",
        "chat_feature": "conversation",
        "text_feature": "body",
        "wandb": "legacy-project",
        "name": "mistral-7b.v2",
        "priority": -5,
        "epochs": 3,
        "memory_budget_mb": 12288,
        "ladder": [{"max_seq_length": 128}, {"lora_parameters": {"rank": 8}, "batch_size": 1}],
        "checkpoint_every": 25,
        "keep_checkpoints": 5,
        "max_retries": 0,
        "heartbeat_interval": 0.5,
        "heartbeat_timeout": 12.5,
        "startup_timeout": 45.0,
        "host_unreachable_minutes": 5.0,
        "cleanup_every": 20,
        "low_memory_mb": 2048,
        "notify": True,
        # One rank (batch_size 1 allows no more), yet every option is set.
        "distributed": {
            "backend": "ring",
            "hosts": ["127.0.0.1"],
            "processes": 1,
            "env": {"MLX_METAL_FAST_SYNCH": "1"},
            "starting_port": 40000,
        },
        "max_processes_per_host": 4,
        "max_record_mb": 16,
    }


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_every_field_round_trips(tmp_path, suffix, reporters):
    """A non-default value for every schema field survives dump -> load -> to_dict."""
    values = non_default_values(tmp_path)
    fields = {f.name: f for f in dataclasses.fields(JobConfig)}
    assert set(values) == set(fields), "add the new field to non_default_values()"
    defaults = {info.name: info.default for info in iter_fields()}
    for name, value in values.items():
        if name != "train":
            assert value != defaults[name], name
    text = yaml.safe_dump(values) if suffix == ".yaml" else json.dumps(values)
    cfg = load_config(write(tmp_path, "whatever" + suffix, text))
    out = cfg.to_dict()
    for name, value in values.items():
        assert out[name] == value, name
    json.dumps(out, allow_nan=False)


def test_iter_fields_describes_every_field():
    """iter_fields lists each top-level field once, with a kind, a default and help text."""
    infos = iter_fields()
    assert [i.name for i in infos] == [f.name for f in dataclasses.fields(JobConfig)]
    by_name = {i.name: i for i in infos}
    assert by_name["model"].default is dataclasses.MISSING
    assert by_name["batch_size"] == ("batch_size", "int", 4, "Minibatch size.")
    assert by_name["lora_parameters"].default == {
        "rank": 8,
        "scale": 20.0,
        "dropout": 0.0,
        "keys": None,
    }
    assert all(i.help and i.kind for i in infos)


def test_numbers_follow_mlx_lm_reading(job_dir):
    """1e-5 is a float, ints are accepted for floats and stored as floats, sizes become bytes."""
    text = BASE + "learning_rate: 1e-5\nheartbeat_interval: 2\nclear_cache_threshold: 2GB\n"
    cfg = load_config(write(job_dir, "job.yaml", text))
    assert cfg.learning_rate == 1e-5
    assert isinstance(cfg.heartbeat_interval, float) and cfg.heartbeat_interval == 2.0
    assert cfg.clear_cache_threshold == 2 * 10**9
    for size, expected in [("512MB", 512 * 10**6), ("1.5G", 15 * 10**8), ("100", 100)]:
        assert minimal(job_dir, clear_cache_threshold=size).clear_cache_threshold == expected
    assert minimal(job_dir, optimizer="AdamW").optimizer == "adamw"
    assert minimal(job_dir, memory_budget_gb=8).memory_budget_mb == 8192


def test_null_means_default_as_in_mlx_lm(job_dir):
    """A null value, in a file or an override, leaves the key at its default like mlx-lm."""
    text = BASE + "batch_size: null\nlora_parameters: null\nladder: null\nresume_adapter_file:\n"
    cfg = load_config(write(job_dir, "job.yaml", text))
    assert (cfg.batch_size, cfg.lora_parameters, cfg.ladder) == (4, LoraParameters(), None)
    capped = cfg.with_overrides({"memory_budget_gb": 4, "checkpoint_every": 9})
    assert capped.memory_budget_mb == 4096
    uncapped = capped.with_overrides({"memory_budget_mb": None, "checkpoint_every": None})
    assert (uncapped.memory_budget_mb, uncapped.checkpoint_every) == (None, None)
    with pytest.raises(ConfigError, match="missing required key 'model'"):
        parse_config({"model": None, "data": "data"}, job_dir)


def test_name_defaults_to_sanitised_file_stem(job_dir):
    """Without 'name' the job is named after its file (made safe), or 'job' with no file."""
    assert load_config(write(job_dir, "mistral-7b.yaml", BASE)).name == "mistral-7b"
    assert load_config(write(job_dir, "my night run.yml", BASE)).name == "my-night-run"
    assert load_config(write(job_dir, "named.yaml", BASE + "name: other\n")).name == "other"
    assert minimal(job_dir).name == "job"


def test_overrides_apply_before_validation(job_dir):
    """load_config's overrides replace file values before they are checked."""
    path = write(job_dir, "job.yaml", BASE + "batch_size: 0\nlora_parameters: {rank: 8}\n")
    cfg = load_config(path, overrides={"batch_size": 2, "lora_parameters": {"scale": 5.0}})
    assert cfg.batch_size == 2
    assert cfg.lora_parameters == LoraParameters(rank=8, scale=5.0)


# --- with_overrides ----------------------------------------------------------------------


def test_with_overrides_deep_merges_and_revalidates(job_dir):
    """lora_parameters merge key-wise, the original is untouched, bad overrides are refused."""
    cfg = minimal(
        job_dir,
        lora_parameters={"rank": 8, "scale": 10.0, "keys": ["self_attn.q_proj"]},
        optimizer_config={"adamw": {"eps": 1e-6}},
    )
    new = cfg.with_overrides(
        {"lora_parameters": {"rank": 4}, "optimizer_config": {"adamw": {"weight_decay": 0.1}}}
    )
    assert new.lora_parameters == LoraParameters(rank=4, scale=10.0, keys=["self_attn.q_proj"])
    assert new.optimizer_config == {"adamw": {"eps": 1e-6, "weight_decay": 0.1}}
    assert cfg.lora_parameters.rank == 8 and new is not cfg
    assert new.name == cfg.name and new.model == cfg.model

    with pytest.raises(ConfigError) as info:
        cfg.with_overrides({"batch_size": 0})
    assert str(info.value) == "override: key 'batch_size': expected an integer >= 1, got 0"
    with pytest.raises(ConfigError, match="rung 3: unknown key 'lora_parameters.rnak'"):
        cfg.with_overrides({"lora_parameters": {"rnak": 4}}, source="rung 3")
    with pytest.raises(ConfigError, match="expected a mapping"):
        cfg.with_overrides([("batch_size", 1)])


def test_with_overrides_of_every_rung_is_valid(job_dir):
    """Each default-ladder rung applies cleanly as an override."""
    cfg = minimal(job_dir, grad_accumulation_steps=4, max_seq_length=256)
    for rung in cfg.effective_ladder():
        cfg = cfg.with_overrides(rung, source="ladder")
    assert (cfg.grad_accumulation_steps, cfg.max_seq_length, cfg.lora_parameters.rank) == (
        2,
        128,
        4,
    )


# --- identity ------------------------------------------------------------------------------

IDENTITY = {
    "model",
    "fine_tune_type",
    "optimizer",
    "optimizer_config",
    "data",
    "seed",
    "iters",
    "learning_rate",
    "resume_adapter_file",
    "lr_schedule",
    "lora_parameters",
    "mask_prompt",
    "hf_dataset",
    "prompt_feature",
    "completion_feature",
    "chat_feature",
    "text_feature",
    "epochs",
}


def test_identity_hash_tracks_exactly_the_run_defining_fields(tmp_path, reporters):
    """Changing any one field changes identity_hash iff that field defines the run."""
    values = non_default_values(tmp_path)
    for name in ("m0", "d0"):
        (tmp_path / name).mkdir()
    base = parse_config({"model": "m0", "data": "d0"}, tmp_path)
    assert LADDER_KEYS.isdisjoint(IDENTITY - {"lora_parameters"})
    for name, value in values.items():
        if name == "train":
            continue
        changed = base.with_overrides({name: value}).identity_hash() != base.identity_hash()
        assert changed == (name in IDENTITY), name


def test_identity_hash_ignores_ladder_knobs_and_name(job_dir):
    """Rung changes, the name and operational knobs leave the hash; seed/model/lr move it."""
    cfg = minimal(job_dir, grad_accumulation_steps=4, max_seq_length=256)
    same = [
        {"lora_parameters": {"rank": 2}},
        {"max_seq_length": 64, "batch_size": 1, "grad_checkpoint": True},
        {"name": "renamed", "priority": 9, "adapter_path": "elsewhere"},
        {"heartbeat_timeout": 99.0, "checkpoint_every": 3, "notify": True},
    ]
    for override in same:
        assert cfg.with_overrides(override).identity_hash() == cfg.identity_hash(), override
    (job_dir / "model2").mkdir()
    different = [
        {"seed": 1},
        {"model": "model2"},
        {"learning_rate": 2e-5},
        {"lora_parameters": {"scale": 1.0}},
        {"lora_parameters": {"dropout": 0.1}},
    ]
    for override in different:
        assert cfg.with_overrides(override).identity_hash() != cfg.identity_hash(), override
    assert len(cfg.identity_hash()) == 64


def test_identity_hash_is_stable_across_processes(job_dir):
    """A fresh interpreter computes the same hash for the same file."""
    path = write(job_dir, "job.yaml", MLX_EXAMPLE_YAML)
    code = "import sys; from loractl.config import load_config as f; print(f(sys.argv[1])"
    code += ".identity_hash())"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
        check=True,
    )  # fmt: skip
    assert out.stdout.strip() == load_config(path).identity_hash()


def test_import_pulls_in_no_mlx_and_leaves_yaml_alone():
    """Importing loractl.config loads neither mlx nor mlx_lm and keeps yaml.SafeLoader stock."""
    code = (
        "import sys, yaml, loractl.config\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')]\n"
        "print(repr(yaml.safe_load('x: 1e-5')['x']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "'1e-5'"


# --- ladder --------------------------------------------------------------------------------


def test_default_ladder_is_the_recipe(job_dir):
    """accum 4, seq 256, rank 8 gives accum 2, then seq 128, then rank 4."""
    cfg = minimal(
        job_dir, grad_accumulation_steps=4, max_seq_length=256, lora_parameters={"rank": 8}
    )
    expected = [
        {"grad_accumulation_steps": 2},
        {"max_seq_length": 128},
        {"lora_parameters": {"rank": 4}},
    ]
    assert default_ladder(cfg) == expected
    assert cfg.effective_ladder() == expected


def test_default_ladder_skips_rungs_that_cannot_halve(job_dir):
    """accum 1, seq 32 and rank 1 have nothing to halve; odd values round down."""
    floor = minimal(
        job_dir, grad_accumulation_steps=1, max_seq_length=32, lora_parameters={"rank": 1}
    )
    assert default_ladder(floor) == []
    odd = minimal(
        job_dir, grad_accumulation_steps=3, max_seq_length=33, lora_parameters={"rank": 3}
    )
    assert default_ladder(odd) == [
        {"grad_accumulation_steps": 1},
        {"max_seq_length": 16},
        {"lora_parameters": {"rank": 1}},
    ]
    full = minimal(job_dir, fine_tune_type="full", max_seq_length=32)
    assert default_ladder(full) == []


def test_explicit_ladder_wins_and_empty_means_none(job_dir):
    """A config's own ladder is used as written; [] disables the ladder."""
    rungs = [{"grad_checkpoint": True}, {"num_layers": 8, "val_batches": 0}]
    cfg = minimal(job_dir, ladder=rungs, grad_accumulation_steps=4)
    assert cfg.effective_ladder() == rungs
    assert minimal(job_dir, ladder=[], grad_accumulation_steps=4).effective_ladder() == []
    copy = cfg.effective_ladder()
    copy[0]["grad_checkpoint"] = False
    assert cfg.ladder[0]["grad_checkpoint"] is True


def test_auto_ladder_keeps_the_effective_batch_first_then_shrinks_the_run(job_dir):
    """`ladder: auto` tries checkpointing and batch-into-accumulation before it changes the
    sequence length, the layers or the rank, and never halves accumulation alone."""
    cfg = minimal(
        job_dir,
        ladder="auto",
        batch_size=4,
        grad_accumulation_steps=1,
        max_seq_length=512,
        num_layers=16,
        lora_parameters={"rank": 8},
    )
    assert cfg.effective_ladder() == [
        {"grad_checkpoint": True},
        {"batch_size": 2, "grad_accumulation_steps": 2},
        {"batch_size": 1, "grad_accumulation_steps": 4},
        {"max_seq_length": 256},
        {"max_seq_length": 128},
        {"num_layers": 8},
        {"lora_parameters": {"rank": 4}},
    ]
    assert cfg.to_dict()["ladder"] == "auto"
    floor = minimal(
        job_dir,
        ladder="auto",
        grad_checkpoint=True,
        batch_size=1,
        max_seq_length=64,
        num_layers=1,
        lora_parameters={"rank": 1},
    )
    assert floor.effective_ladder() == []


def test_a_ladder_that_is_neither_a_list_nor_auto_is_refused(job_dir):
    """Any other string is an error that names what is allowed."""
    with pytest.raises(ConfigError, match="'auto'"):
        minimal(job_dir, ladder="sometimes")


def test_ladder_keys_are_the_documented_set():
    """LADDER_KEYS holds the memory knobs a rung may change, and nothing run-defining."""
    assert LADDER_KEYS == {
        "grad_accumulation_steps",
        "max_seq_length",
        "batch_size",
        "grad_checkpoint",
        "num_layers",
        "lora_parameters",
        "steps_per_eval",
        "val_batches",
    }


# --- derived values -------------------------------------------------------------------------


def test_checkpoint_interval_and_total_examples(job_dir):
    """checkpoint_interval converts save_every to optimizer steps; epochs set the run length."""
    cfg = minimal(job_dir, save_every=100, grad_accumulation_steps=4, batch_size=2, iters=50)
    assert cfg.checkpoint_interval == 25
    assert minimal(job_dir, save_every=3, grad_accumulation_steps=4).checkpoint_interval == 1
    assert minimal(job_dir, checkpoint_every=7).checkpoint_interval == 7
    assert cfg.total_examples(train_len=1000) == 100
    assert minimal(job_dir, epochs=3).total_examples(train_len=1000) == 3000


def test_mlx_lm_args_match_adapter_config_shape(job_dir):
    """mlx_lm_args drops loractl keys and mirrors mlx-lm for keys=None and full fine-tunes."""
    cfg = minimal(job_dir, epochs=2, ladder=[])
    args = cfg.mlx_lm_args()
    loractl_only = {"name", "priority", "epochs", "memory_budget_mb", "ladder", "notify"}
    assert loractl_only.isdisjoint(args)
    assert args["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.0}
    assert minimal(job_dir, fine_tune_type="full").mlx_lm_args()["lora_parameters"] is None
    args["batch_size"] = 99
    assert cfg.batch_size == 4


@pytest.mark.parametrize(("filename", "content", "expected", "line"), MALFORMED)
def test_malformed_config_exits_78_from_the_cli_without_traceback(
    job_dir, filename, content, expected, line
):
    """`loractl config validate` on each malformed config exits 78 naming the problem."""
    from click.testing import CliRunner

    from loractl.client.cli import main

    path = write(job_dir, filename, content)
    result = CliRunner().invoke(main, ["config", "validate", str(path)])
    assert result.exit_code == 78, result.output
    assert expected in result.output
    assert "Traceback" not in result.output


# --- keys mlx_lm.lora ignores ----------------------------------------------------------------


def test_keys_mlx_lm_ignores_load_with_a_warning_naming_them(job_dir):
    """An mlx-lm config carrying other tools' keys loads, each key named in a warning."""
    text = MLX_EXAMPLE_YAML + "train_mode: sft\nbeta: 0.1\nload_in_4bits: true\n"
    cfg = load_config(write(job_dir, "job.yaml", text))
    assert cfg.batch_size == 4 and cfg.optimizer == "adamw"
    assert len(cfg.warnings) == 3
    for key, warning in zip(("train_mode", "beta", "load_in_4bits"), cfg.warnings, strict=True):
        assert f"key '{key}'" in warning and "ignored" in warning
        assert warning.startswith(str(job_dir / "job.yaml") + ": ")
    assert load_config(write(job_dir, "plain.yaml", MLX_EXAMPLE_YAML)).warnings == []


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("learnig_rate", "learning_rate"),
        ("batch_sise", "batch_size"),
        ("seeed", "seed"),
        ("iter", "iters"),
        ("gradient_accumulation_steps", "grad_accumulation_steps"),
    ],
)
def test_a_near_miss_of_a_known_key_stays_an_error(job_dir, key, suggestion):
    """A key one or two characters off a known one is refused with 'did you mean'."""
    with pytest.raises(ConfigError, match=f"unknown key '{key}' \\(did you mean '{suggestion}'"):
        minimal(job_dir, **{key: 1})


def test_warnings_travel_with_overrides_and_legacy_wandb_is_named(job_dir):
    """A rung's config keeps the submitted file's warnings; 'wandb:' says it is ignored."""
    cfg = minimal(job_dir, judge="gpt", wandb="old-project")
    assert [w.split(": ", 1)[1].split(";")[0] for w in cfg.warnings] == [
        "key 'judge' is not an mlx_lm.lora or loractl key",
        "key 'wandb' is ignored, as mlx_lm.lora ignores it since it gained report_to",
    ]
    assert cfg.with_overrides({"max_seq_length": 128}).warnings == cfg.warnings


def test_report_to_a_package_that_is_not_installed_is_a_config_error(job_dir, monkeypatch):
    """report_to naming a missing package fails at load time, not when reporting starts."""
    # A None entry in sys.modules is how Python marks a module as not importable.
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="key 'report_to': wandb is not installed"):
        minimal(job_dir, report_to="wandb")
    monkeypatch.setitem(sys.modules, "swanlab", None)
    with pytest.raises(ConfigError, match="swanlab is not installed"):
        minimal(job_dir, report_to="swanlab")


def test_report_to_an_installed_package_loads(job_dir, reporters):
    """With the packages installed, report_to keeps mlx-lm's comma-separated spelling."""
    assert minimal(job_dir, report_to="wandb, swanlab").report_to == "wandb, swanlab"


def test_hf_dataset_entries_are_checked_as_mlx_lm_reads_them(job_dir):
    """Split names must be strings, 'config' a mapping, and 'test: true' needs a test_split."""
    hf = {"path": "org/set"}
    with pytest.raises(ConfigError, match="key 'hf_dataset.train_split'"):
        minimal(job_dir, hf_dataset={**hf, "train_split": 3})
    with pytest.raises(ConfigError, match="key 'hf_dataset\\[1\\].config'"):
        minimal(job_dir, hf_dataset=[hf, {**hf, "config": "x"}])
    with pytest.raises(ConfigError, match="'test: true' needs a 'test_split'"):
        minimal(job_dir, hf_dataset=hf, test=True)
    assert minimal(job_dir, hf_dataset={**hf, "test_split": "test"}, test=True).test


def test_optimizer_arguments_match_mlx_optimizer_signatures():
    """The optimizer argument table equals mlx.optimizers' own constructor signatures."""
    import inspect

    import mlx.optimizers as optim

    from loractl.config import _OPTIMIZER_ARGS

    classes = {
        "adam": optim.Adam,
        "adamw": optim.AdamW,
        "muon": optim.Muon,
        "sgd": optim.SGD,
        "adafactor": optim.Adafactor,
    }
    assert set(classes) == set(_OPTIMIZER_ARGS)
    for name, cls in classes.items():
        params = set(inspect.signature(cls.__init__).parameters) - {"self", "learning_rate"}
        assert _OPTIMIZER_ARGS[name] == params, name


@pytest.mark.parametrize("folder", ["/etc", "/usr/share/x", "/System/Library", "/"])
def test_adapter_path_in_a_system_folder_is_refused(job_dir, folder):
    """adapter_path never points into the system: checkpoints and a lock file would land there."""
    with pytest.raises(ConfigError, match="is a system folder"):
        load_config(
            write(job_dir, "job.yaml", f"model: model\ndata: data\nadapter_path: {folder}\n")
        )


def test_data_that_is_a_device_says_what_it_is(job_dir):
    """data: /dev/zero is named for what it is (a character device), not "does not exist"."""
    with pytest.raises(ConfigError, match="is a character device, not a folder holding train"):
        load_config(write(job_dir, "job.yaml", "model: model\ndata: /dev/zero\n"))


def test_a_hostfile_that_is_a_device_is_named_as_one(job_dir):
    """hostfile: /dev/zero is "a character device", not "does not exist"."""
    with pytest.raises(ConfigError, match="'/dev/zero' is a character device, not a file"):
        parse_config(
            {"model": "model", "data": "data", "distributed": {"hostfile": "/dev/zero"}}, job_dir
        )
