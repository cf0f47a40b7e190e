"""The job-config schema: one dataclass that loading, validation and the CLI all read.

A job config is a superset of mlx-lm's ``lora`` YAML config, so an existing
``mlx_lm.lora -c config.yaml`` file loads unchanged; loractl's own keys sit beside mlx-lm's.
Every field of :class:`JobConfig` carries its help text, validator and role (mlx-lm key,
part of the run's identity, allowed on a ladder rung) in its metadata, so adding a key is one
edit in one place.

This module never imports mlx or mlx_lm: the supervisor and the client import it, and they
must start fast and stay small. What mlx-lm would check at run time (optimizer arguments,
schedule names) is therefore hardcoded here against the pinned mlx / mlx-lm versions.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import math
import os
import re
import stat
import sys
import tomllib
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from loractl import distributed as _dist

__all__ = [
    "LADDER_KEYS",
    "MAX_CONFIG_BYTES",
    "ConfigError",
    "DataFileError",
    "FieldInfo",
    "JobConfig",
    "LoraParameters",
    "deep_merge",
    "adapter_path_problem",
    "file_kind",
    "data_file_problem",
    "default_ladder",
    "iter_fields",
    "load_config",
    "parse_config",
]

# The inbox rejects anything bigger too; a config is a page of settings, not a data file.
MAX_CONFIG_BYTES = 1_000_000

_SHOWN_CHARS = 60
# Free-form values (hf_dataset, optimizer_config) are copied node by node; YAML aliases can
# make a small file describe an exponentially large tree, so the copy has a budget.
_MAX_NODES = 10_000
_MAX_DEPTH = 32


class ConfigError(ValueError):
    """A job config that loractl refuses, with a one-line message a user can act on.

    ``key`` is the offending key ("batch_size", "lora_parameters.alpha", "ladder[2].rank") or
    None when the problem is the file itself; ``source`` names where the config came from.
    ``exit_code`` is what a command refusing it exits with (EX_CONFIG).
    """

    exit_code = 78

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        source: str = "<config>",
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.message = message
        self.key = key
        self.source = source
        self.line = line
        self.column = column
        where = source
        if line is not None:
            where += f": line {line}" + (f", column {column}" if column is not None else "")
        super().__init__(f"{where}: {message}")

    def __reduce__(
        self,
    ) -> tuple[Callable[..., ConfigError], tuple[str, str | None, str, int | None, int | None]]:
        # The default pickling would call ConfigError(full_message) and lose key/source;
        # errors do cross process boundaries (trainer -> supervisor).
        return (_rebuild_error, (self.message, self.key, self.source, self.line, self.column))


def _rebuild_error(
    message: str, key: str | None, source: str, line: int | None, column: int | None
) -> ConfigError:
    return ConfigError(message, key=key, source=source, line=line, column=column)


class DataFileError(ConfigError):
    """A config whose data files cannot be read as data (a device, a FIFO, a socket): bad
    data, exit 65 (EX_DATAERR), not a bad config; retrying cannot help."""

    exit_code = 65

    def __reduce__(
        self,
    ) -> tuple[Callable[..., ConfigError], tuple[str, str | None, str, int | None, int | None]]:
        return (_rebuild_data_error, (self.message, self.key, self.source, self.line, self.column))


def _rebuild_data_error(
    message: str, key: str | None, source: str, line: int | None, column: int | None
) -> DataFileError:
    return DataFileError(message, key=key, source=source, line=line, column=column)


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > _SHOWN_CHARS:
        text = text[: _SHOWN_CHARS - 3] + "..."
    return text


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _suggest(word: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, sorted(options), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


# How alike an unknown top-level key must be to a known one to count as its typo (difflib's
# ratio): one or two characters off ('learnig_rate', 'batch_sise', 'seeed') is a typo and an
# error; a key of another tool ('train_mode', 'beta', 'load_in_4bits') is ignored with a
# warning, as mlx_lm.lora ignores it.
NEAR_MISS_CUTOFF = 0.8


def _near_miss(word: str, options: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(word, sorted(options), n=1, cutoff=NEAR_MISS_CUTOFF)
    return match[0] if match else None


@dataclass(frozen=True)
class _Ctx:
    source: str
    base_dir: str

    def error(self, message: str, key: str | None = None) -> ConfigError:
        return ConfigError(message, key=key, source=self.source)

    def bad(self, key: str, expected: str, value: Any) -> ConfigError:
        return self.error(f"key '{key}': expected {expected}, got {_show(value)}", key)

    def unknown(self, key: str, options: Iterable[str], hint: str | None = None) -> ConfigError:
        name = key.rsplit(".", 1)[-1]
        extra = f" ({hint})" if hint else _suggest(name, options)
        return self.error(f"unknown key '{key}'{extra}", key)


Check = Callable[[Any, str, _Ctx], Any]


# --- value checks ---------------------------------------------------------------------------
# Strict on purpose: a typo'd type in an overnight job should fail at submit time, not at 3am.
# The one leniency is int -> float, because YAML, TOML and JSON all write "1" for 1.0.
# bool is a subclass of int in Python, so it is excluded explicitly everywhere.


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(
    lo: int | None = None,
    hi: int | None = None,
    *,
    also: tuple[int, ...] = (),
    optional: bool = False,
) -> Check:
    if lo is not None and hi is not None:
        span = f"an integer from {lo} to {hi}"
    elif lo is not None:
        span = f"an integer >= {lo}"
    else:
        span = "an integer"
    expected = " or ".join(["null"] * optional + [str(a) for a in also] + [span])

    def check(value: Any, key: str, ctx: _Ctx) -> int | None:
        if value is None and optional:
            return None
        if _is_int(value) and (
            value in also or ((lo is None or value >= lo) and (hi is None or value <= hi))
        ):
            return int(value)
        raise ctx.bad(key, expected, value)

    return check


def _as_float(value: Any) -> float | None:
    if not _is_number(value):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _float(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    optional: bool = False,
) -> Check:
    limits = []
    if gt is not None:
        limits.append(f"> {gt}")
    if ge is not None:
        limits.append(f">= {ge}")
    if lt is not None:
        limits.append(f"< {lt}")
    expected = "a finite number" + (" " + " and ".join(limits) if limits else "")
    if optional:
        expected = "null or " + expected

    def check(value: Any, key: str, ctx: _Ctx) -> float | None:
        if value is None and optional:
            return None
        number = _as_float(value)
        if (
            number is None
            or (gt is not None and number <= gt)
            or (ge is not None and number < ge)
            or (lt is not None and number >= lt)
        ):
            raise ctx.bad(key, expected, value)
        return number

    return check


def _bool() -> Check:
    def check(value: Any, key: str, ctx: _Ctx) -> bool:
        if not isinstance(value, bool):
            raise ctx.bad(key, "true or false", value)
        return value

    return check


def _str(*, optional: bool = False) -> Check:
    expected = ("null or " if optional else "") + "a non-empty string"

    def check(value: Any, key: str, ctx: _Ctx) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ctx.bad(key, expected, value)
        return value

    return check


def _choice(options: tuple[str, ...], *, fold_case: bool = False) -> Check:
    expected = "one of " + ", ".join(f"'{o}'" for o in options)

    def check(value: Any, key: str, ctx: _Ctx) -> str:
        if isinstance(value, str):
            # mlx-lm lowercases the optimizer name itself, so "AdamW" works there and here.
            candidate = value.lower() if fold_case else value
            if candidate in options:
                return candidate
            raise ctx.error(
                f"key '{key}': expected {expected}, got {_show(value)}"
                + _suggest(candidate, options),
                key,
            )
        raise ctx.bad(key, expected, value)

    return check


_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")


def _name(value: Any, key: str, ctx: _Ctx) -> str:
    # The name ends up in folder names and log lines, so no spaces, slashes or leading dot.
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ctx.bad(
            key,
            "1-64 characters of A-Z a-z 0-9 . _ - (not starting with '.' or '-')",
            value,
        )
    return value


def _resolve(value: str, base_dir: str) -> str:
    # abspath, not resolve(): keep the user's symlinks (HF caches are built from them).
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


_HF_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _looks_like_hf_id(value: str) -> bool:
    return (
        bool(_HF_ID.match(value))
        and not value.startswith((".", "/", "~"))
        and not {".", ".."} & set(value.split("/"))
    )


def _local_or_hub(value: Any, key: str, ctx: _Ctx) -> str:
    # Same rule as mlx-lm: an existing local path wins, anything else goes to the Hub. Unlike
    # mlx-lm we insist the Hub reading is plausible, so a typo'd path fails now, not after a
    # failed download.
    if not isinstance(value, str) or not value.strip():
        raise ctx.bad(key, "a local path or a Hugging Face repo id", value)
    local = _resolve(value, ctx.base_dir)
    if os.path.exists(local):
        if not os.path.isdir(local):
            what = _file_kind(local)
            raise ctx.error(
                f"key '{key}': {local!r} is {what}, not a folder"
                + (
                    " holding train.jsonl (and valid.jsonl)"
                    if key == "data"
                    else " holding config.json and the weights"
                ),
                key,
            )
        return local
    if _looks_like_hf_id(value):
        return value
    raise ctx.error(
        f"key '{key}': path {local!r} does not exist"
        " (and it is not a Hugging Face repo id like 'org/name')",
        key,
    )


def _existing_file(value: Any, key: str, ctx: _Ctx) -> str | None:
    if value is None:
        return None
    return _existing_path(value, key, ctx, "null or a path to an adapter file")


def _existing_path(value: Any, key: str, ctx: _Ctx, expected: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ctx.bad(key, expected, value)
    local = _resolve(value, ctx.base_dir)
    if not os.path.isfile(local):
        if os.path.exists(local):
            raise ctx.error(f"key '{key}': {local!r} is {_file_kind(local)}, not a file", key)
        raise ctx.error(f"key '{key}': file {local!r} does not exist", key)
    return local


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words ("a named pipe", "a character device")."""
    return next((words for test, words in _KINDS if test(mode)), "a file")


def _file_kind(path: str) -> str:
    return file_kind(os.stat(path).st_mode)


# The files of a local data folder, as mlx-lm's load_local_dataset names them.
DATA_SPLITS = ("train", "valid", "test")


def data_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as a data file, or None (a regular file, or nothing).

    Symlinks are followed: one to /dev/zero would be read for ever, a FIFO blocks the reader
    until someone writes, a socket cannot be opened at all. The message names what the path
    is, and what a link points at: "…/train.jsonl is a character device (/dev/zero), not a
    regular file".
    """
    path = os.fspath(path)
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror or exc}"
    target = ""
    if stat.S_ISLNK(link.st_mode):
        target = os.path.realpath(path)
        if not os.path.exists(path):
            return (
                f"{path} is a symlink to {os.readlink(path)} that cannot be followed "
                "(dangling or a loop)"
            )
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    shown = f" ({target})" if target else ""
    return f"{path} is {_file_kind(path)}{shown}, not a regular file"


def _check_data_files(cfg: JobConfig, ctx: _Ctx) -> None:
    """A local data folder's train/valid/test.jsonl, those present, must be regular files,
    and the training and validation sets must hold a batch each."""
    if cfg.hf_dataset is not None or cfg.data is None or not os.path.isabs(cfg.data):
        return
    for split in DATA_SPLITS:
        problem = data_file_problem(os.path.join(cfg.data, f"{split}.jsonl"))
        if problem:
            raise DataFileError(
                f"key 'data': {problem}; training data must be regular JSONL files",
                key="data",
                source=ctx.source,
            )
    for split in ("train", "valid") if cfg.val_batches != 0 else ("train",):
        path = os.path.join(cfg.data, f"{split}.jsonl")
        count = _count_samples(path, cfg.batch_size, cfg.max_record_mb)
        if count is not None and 0 < count < cfg.batch_size:
            # mlx-lm refuses it only when its batches are built; loractl trained and printed
            # "val loss nan". Neither helps a job that runs overnight.
            what = "training" if split == "train" else "validation"
            raise DataFileError(
                f"key 'data': {path} holds {count} {what} example{'s' * (count != 1)}, fewer "
                f"than batch_size {cfg.batch_size}; add examples or lower batch_size",
                key="data",
                source=ctx.source,
            )


def _count_samples(path: str, enough: int, max_record_mb: int) -> int | None:
    """The non-blank lines of ``path``, counted up to ``enough`` (a large file is not read to
    its end); None when it cannot be read (that is the trainer's to report, with the line)."""
    count = 0
    limit = max(1, max_record_mb) * 1024 * 1024
    try:
        with open(path, "rb") as handle:
            while count < enough:
                line = handle.readline(limit + 1)
                if not line:
                    break
                if line.strip():
                    count += 1
    except OSError:
        return None
    return count


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def adapter_path_problem(
    adapter_path: str | os.PathLike[str],
    home: str | os.PathLike[str],
    other_adapter_paths: Mapping[str, str | os.PathLike[str]] | None = None,
) -> str | None:
    """Why a job may not write its adapters at ``adapter_path``, or None.

    For an adapter_path the user chose (the queue's own default, ``<home>/jobs/<id>/adapters``,
    is not checked here): not inside loractl's home, whose inbox, job folders and database
    the supervisor moves, replaces and deletes; and neither inside nor above another job's
    adapter folder (``other_adapter_paths``: job -> its folder), whose checkpoints and
    adapters one job would then overwrite, delete or "resume" as the other's. Paths compare
    after resolving symlinks. An equal path is the queue's own check (it allows reuse once
    the other job has ended), so it is not refused here.
    """
    wanted = os.path.realpath(adapter_path)
    home_real = os.path.realpath(home)
    if _is_within(wanted, home_real):
        return (
            f"adapter_path {os.fspath(adapter_path)} is inside loractl's home {home_real}, "
            "whose inbox, job folders and database the supervisor moves and deletes; choose a "
            "folder outside it, or leave adapter_path unset to get <home>/jobs/<id>/adapters"
        )
    for job, other in (other_adapter_paths or {}).items():
        theirs = os.path.realpath(other)
        if wanted == theirs:
            continue
        if _is_within(wanted, theirs):
            return (
                f"adapter_path {os.fspath(adapter_path)} is inside job {job}'s adapter folder "
                f"{theirs}; its checkpoints would be mixed with this job's. Choose a folder of "
                "its own"
            )
        if _is_within(theirs, wanted):
            return (
                f"adapter_path {os.fspath(adapter_path)} holds job {job}'s adapter folder "
                f"{theirs}; this job's checkpoints and adapters would be mixed with that "
                "job's. Choose a folder of its own"
            )
    return None


# Never somewhere the system lives: checkpoints, logs and a lock file would land there.
_SYSTEM_FOLDERS = (
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/sbin", "/sys", "/usr",
    "/System", "/Library", "/Applications", "/private/etc", "/private/var/db", "/var/db",
)  # fmt: skip


def _output_path(value: Any, key: str, ctx: _Ctx) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ctx.bad(key, "a non-empty path", value)
    resolved = _resolve(value, ctx.base_dir)
    real = os.path.realpath(resolved)
    for system in _SYSTEM_FOLDERS:
        if real == system or real.startswith(system + os.sep) or real == os.sep:
            raise ctx.error(
                f"key '{key}': {resolved!r} is a system folder; loractl writes checkpoints, "
                "logs and a lock file there. Choose a folder of your own",
                key,
            )
    return resolved


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmg]?)(b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def _size(value: Any, key: str, ctx: _Ctx) -> int:
    # mlx-lm parses "2GB"-style sizes (decimal units) on its command line only; loractl takes
    # the same spelling in the file and stores bytes.
    expected = "a byte count >= 0 or a size like '512MB' or '2GB'"
    if _is_int(value) and value >= 0:
        return int(value)
    if isinstance(value, str) and (match := _SIZE_RE.match(value)):
        digits, unit, _ = match.groups()
        try:
            return int(Decimal(digits) * _SIZE_UNITS[unit.lower()])
        except InvalidOperation:
            pass
    raise ctx.bad(key, expected, value)


def _plain(value: Any, key: str, ctx: _Ctx, budget: list[int] | None = None, depth: int = 0) -> Any:
    """A JSON-safe deep copy of a free-form value, or ConfigError."""
    budget = [_MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0 or depth > _MAX_DEPTH:
        raise ctx.error(f"key '{key}': value is too large or nested too deeply", key)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ctx.bad(key, "a finite number", value)
        return value
    if isinstance(value, list):
        return [_plain(v, f"{key}[{i}]", ctx, budget, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ctx.bad(key, "a mapping with string keys", value)
            out[k] = _plain(v, f"{key}.{k}", ctx, budget, depth + 1)
        return out
    raise ctx.bad(key, "plain data (string, number, boolean, null, list or mapping)", value)


def _mapping(value: Any, key: str, ctx: _Ctx, what: str = "a mapping") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ctx.bad(key, what, value)
    for k in value:
        if not isinstance(k, str):
            raise ctx.bad(key, "a mapping with string keys", value)
    return value


# mlx.optimizers constructor arguments (mlx 0.32.4), minus learning_rate, which mlx-lm passes
# itself; hardcoded because importing mlx here is not allowed.
_OPTIMIZER_ARGS: dict[str, frozenset[str]] = {
    "adam": frozenset({"betas", "eps", "bias_correction"}),
    "adamw": frozenset({"betas", "eps", "weight_decay", "bias_correction"}),
    "muon": frozenset({"momentum", "weight_decay", "nesterov", "ns_steps"}),
    "sgd": frozenset({"momentum", "weight_decay", "dampening", "nesterov"}),
    "adafactor": frozenset(
        {
            "eps",
            "clip_threshold",
            "decay_rate",
            "beta_1",
            "weight_decay",
            "scale_parameter",
            "relative_step",
            "warmup_init",
        }
    ),
}
_OPTIMIZERS = tuple(_OPTIMIZER_ARGS)


def _optimizer_config(value: Any, key: str, ctx: _Ctx) -> dict[str, Any]:
    _mapping(value, key, ctx, "a mapping of optimizer name to its arguments")
    out = {}
    for name, args in value.items():
        if name not in _OPTIMIZER_ARGS:
            raise ctx.unknown(f"{key}.{name}", _OPTIMIZERS)
        sub = f"{key}.{name}"
        _mapping(args, sub, ctx, "a mapping of argument names to values")
        for arg in args:
            if arg == "learning_rate":
                raise ctx.unknown(f"{sub}.{arg}", (), "set the top-level 'learning_rate' instead")
            if arg not in _OPTIMIZER_ARGS[name]:
                raise ctx.unknown(f"{sub}.{arg}", _OPTIMIZER_ARGS[name])
        out[name] = _plain(args, sub, ctx)
    return out


# mlx.optimizers.schedulers names with how many positional arguments each takes.
# join_schedules is listed so its name is recognised, but it combines schedule *functions* and
# cannot be built from numbers; mlx-lm's "warmup" sub-key covers the common use.
_SCHEDULES: dict[str, tuple[int, int] | None] = {
    "cosine_decay": (2, 3),  # init, decay_steps[, end]
    "exponential_decay": (2, 2),  # init, decay_rate
    "linear_schedule": (3, 3),  # init, end, steps
    "step_decay": (3, 3),  # init, decay_rate, step_size
    "join_schedules": None,
}
_SCHEDULE_KEYS = ("name", "arguments", "warmup", "warmup_init")


def _lr_schedule(value: Any, key: str, ctx: _Ctx) -> dict[str, Any] | None:
    if value is None:
        return None
    _mapping(value, key, ctx, "null or a mapping with 'name' and 'arguments'")
    for sub in value:
        if sub not in _SCHEDULE_KEYS:
            raise ctx.unknown(f"{key}.{sub}", _SCHEDULE_KEYS)
    for required in ("name", "arguments"):
        if required not in value:
            raise ctx.error(f"missing required key '{key}.{required}'", f"{key}.{required}")
    name = _choice(tuple(_SCHEDULES))(value["name"], f"{key}.name", ctx)
    arity = _SCHEDULES[name]
    if arity is None:
        raise ctx.error(
            f"key '{key}.name': '{name}' combines schedule functions and cannot be built"
            " from a config; use 'warmup' for a warmup phase",
            f"{key}.name",
        )
    args = value["arguments"]
    lo, hi = arity
    count = f"{lo}" if lo == hi else f"{lo} or {hi}"
    expected = f"a list of {count} finite numbers for {name}"
    if not isinstance(args, list) or not lo <= len(args) <= hi:
        raise ctx.bad(f"{key}.arguments", expected, args)
    numbers = []
    for arg in args:
        if _as_float(arg) is None:
            raise ctx.bad(f"{key}.arguments", expected, args)
        numbers.append(arg)
    out: dict[str, Any] = {"name": name, "arguments": numbers}
    if "warmup" in value:
        out["warmup"] = _int(0)(value["warmup"], f"{key}.warmup", ctx)
    if "warmup_init" in value:
        out["warmup_init"] = _float()(value["warmup_init"], f"{key}.warmup_init", ctx)
    return out


def _hf_dataset(value: Any, key: str, ctx: _Ctx) -> Any:
    if value is None:
        return None
    entries = value if isinstance(value, list) else [value]
    if not entries:
        raise ctx.bad(key, "null, a mapping or a non-empty list of mappings", value)
    for i, entry in enumerate(entries):
        sub = f"{key}[{i}]" if isinstance(value, list) else key
        _mapping(entry, sub, ctx, "a mapping with at least 'path'")
        if not isinstance(entry.get("path"), str) or not entry["path"].strip():
            hint = "; mlx-lm reads it from 'path', not 'name'" if "name" in entry else ""
            raise ctx.error(
                f"key '{sub}': missing required key 'path' (the dataset's Hub id{hint})", sub
            )
        # The keys mlx-lm's load_custom_hf_dataset reads; others it ignores, and so do we.
        for split in ("train_split", "valid_split", "test_split"):
            if split in entry:
                _str()(entry[split], f"{sub}.{split}", ctx)
        if "config" in entry:
            _mapping(entry["config"], f"{sub}.config", ctx, "a mapping of load_dataset arguments")
    return _plain(value, key, ctx)


# mlx_lm.tuner.callbacks.SUPPORT_CALLBACK's services; each is a package of the same name.
_REPORTERS = ("wandb", "swanlab")


def _report_to(value: Any, key: str, ctx: _Ctx) -> str | None:
    if value is None:
        return None
    expected = "null or a comma-separated list of 'wandb', 'swanlab'"
    if not isinstance(value, str):
        raise ctx.bad(key, expected, value)
    for item in value.split(","):
        service = item.strip().lower()
        if service and service not in _REPORTERS:
            raise ctx.error(
                f"key '{key}': expected {expected}, got {_show(value)}"
                + _suggest(service, _REPORTERS),
                key,
            )
        # mlx-lm finds out only when it builds the callback, after the model has loaded;
        # an overnight job should hear it at submit time. find_spec looks, never imports.
        if service and importlib.util.find_spec(service) is None:
            raise ctx.error(
                f"key '{key}': {service} is not installed in {sys.executable}; install it"
                f" (pip install {service}) or remove '{service}' from {key}",
                key,
            )
    return value


def _train(value: Any, key: str, ctx: _Ctx) -> bool:
    enabled: bool = _bool()(value, key, ctx)
    if not enabled:
        raise ctx.error(
            f"key '{key}': loractl always trains; remove 'train: false'"
            " (evaluate-only runs belong to 'mlx_lm.lora --test')",
            key,
        )
    return enabled


@dataclass
class LoraParameters:
    """mlx-lm's ``lora_parameters``: adapter rank, scale (mlx-lm's name for alpha/rank),
    dropout, and optionally which module keys get adapters (None: mlx-lm's default set)."""

    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    keys: list[str] | None = None


_LORA_CHECKS: dict[str, Check] = {
    "rank": _int(1),
    "scale": _float(),
    "dropout": _float(ge=0, lt=1),
}
_LORA_KEYS = tuple(f.name for f in dataclasses.fields(LoraParameters))
# The only sub-key a ladder rung may change: the supervisor converts the adapter by SVD for it.
_LADDER_LORA_KEYS = frozenset({"rank"})


def _lora_keys(value: Any, key: str, ctx: _Ctx) -> list[str] | None:
    expected = "null or a non-empty list of module names like 'self_attn.q_proj'"
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(k, str) and k.strip() for k in value)
    ):
        raise ctx.bad(key, expected, value)
    return list(value)


def _lora_subkeys(value: Any, key: str, ctx: _Ctx, allowed: Collection[str]) -> dict[str, Any]:
    _mapping(value, key, ctx)
    for sub in value:
        if sub == "alpha":
            raise ctx.unknown(
                f"{key}.alpha",
                (),
                "mlx-lm's LoRA config uses 'scale', not 'alpha'; scale is roughly alpha / rank",
            )
        if sub not in allowed:
            if sub in _LORA_KEYS:
                raise ctx.error(
                    f"key '{key}.{sub}': a ladder rung may only change lora_parameters.rank",
                    f"{key}.{sub}",
                )
            raise ctx.unknown(f"{key}.{sub}", allowed)
    out = {}
    for sub, v in value.items():
        check = _lora_keys if sub == "keys" else _LORA_CHECKS[sub]
        out[sub] = check(v, f"{key}.{sub}", ctx)
    return out


def _lora_parameters(value: Any, key: str, ctx: _Ctx) -> LoraParameters:
    return LoraParameters(**_lora_subkeys(value, key, ctx, _LORA_KEYS))


def _lora_rung(value: Any, key: str, ctx: _Ctx) -> dict[str, Any]:
    out = _lora_subkeys(value, key, ctx, _LADDER_LORA_KEYS)
    if not out:
        raise ctx.bad(key, "a mapping with 'rank'", value)
    return out


# `ladder: auto`: the rungs are built from the job itself (see auto_ladder).
AUTO_LADDER = "auto"


def _ladder(value: Any, key: str, ctx: _Ctx) -> list[dict[str, Any]] | str | None:
    if value is None or value == AUTO_LADDER:
        return value  # type: ignore[no-any-return]  # None or the string "auto"
    if not isinstance(value, list):
        raise ctx.bad(
            key, "null, 'auto', or a list of rungs, each a mapping of settings to change", value
        )
    rungs = []
    by_name = {f.name: f for f in dataclasses.fields(JobConfig)}
    for i, rung in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(rung, dict) or not rung:
            raise ctx.bad(where, "a non-empty mapping of settings to change", rung)
        out = {}
        for name, setting in rung.items():
            if not isinstance(name, str):
                raise ctx.bad(where, "a mapping with string keys", rung)
            sub = f"{where}.{name}"
            if name not in LADDER_KEYS:
                if name in by_name:
                    raise ctx.error(
                        f"key '{sub}': '{name}' cannot change on a ladder rung; rungs may set "
                        + ", ".join(sorted(LADDER_KEYS)),
                        sub,
                    )
                raise ctx.unknown(sub, LADDER_KEYS)
            check = _lora_rung if name == "lora_parameters" else by_name[name].metadata["check"]
            out[name] = check(setting, sub, ctx)
        rungs.append(out)
    return rungs


_DISTRIBUTED_KEYS = ("backend", "hosts", "hostfile", "processes", "env", "starting_port")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _distributed(value: Any, key: str, ctx: _Ctx) -> dict[str, Any] | None:
    """mlx.launch's options for a multi-process job; checked here so that a bad layout fails
    at submit time rather than in the launcher's argparse at 3am."""
    if value is None:
        return None
    _mapping(value, key, ctx, "null or a mapping of mlx.launch options")
    for sub in value:
        if sub not in _DISTRIBUTED_KEYS:
            raise ctx.unknown(f"{key}.{sub}", _DISTRIBUTED_KEYS)
    out: dict[str, Any] = {}
    backend = value.get("backend")
    if backend is not None:
        out["backend"] = _choice(_dist.BACKENDS)(backend, f"{key}.backend", ctx)
    hosts = value.get("hosts")
    if hosts is not None:
        if isinstance(hosts, str):
            hosts = [h.strip() for h in hosts.split(",")]
        if (
            not isinstance(hosts, list)
            or not hosts
            or not all(isinstance(h, str) and h.strip() and "," not in h for h in hosts)
        ):
            raise ctx.bad(f"{key}.hosts", "a non-empty list of host names or IPs", value["hosts"])
        out["hosts"] = [h.strip() for h in hosts]
    hostfile = value.get("hostfile")
    if hostfile is not None:
        if hosts is not None:
            raise ctx.error(f"key '{key}': set 'hosts' or 'hostfile', not both", f"{key}.hosts")
        if value.get("processes") not in (None, 1):
            # mlx.launch ignores -n with a hostfile; saying so beats a silently smaller job.
            raise ctx.error(
                f"key '{key}.processes': mlx.launch ignores it with a hostfile, which lists "
                "one entry per rank",
                f"{key}.processes",
            )
        path = _existing_path(hostfile, f"{key}.hostfile", ctx, "a path to a hostfile")
        try:
            _dist.hostfile_hosts(path)
        except ValueError as exc:
            raise ctx.error(f"key '{key}.hostfile': {exc}", f"{key}.hostfile") from None
        out["hostfile"] = path
    processes = value.get("processes")
    if processes is not None:
        out["processes"] = _int(1)(processes, f"{key}.processes", ctx)
    env = value.get("env")
    if env is not None:
        _mapping(env, f"{key}.env", ctx, "a mapping of environment variable names to values")
        out["env"] = {}
        for name, setting in env.items():
            where = f"{key}.env.{name}"
            if not _ENV_NAME.match(name):
                # mlx.launch drops such a name with only a warning on its stderr.
                raise ctx.bad(where, "a name of letters, digits and '_'", name)
            if isinstance(setting, bool) or not isinstance(setting, (str, int, float)):
                raise ctx.bad(where, "a string or a number", setting)
            out["env"][name] = str(setting)
    port = value.get("starting_port")
    if port is not None:
        out["starting_port"] = _int(1024, 65535)(port, f"{key}.starting_port", ctx)
    if out.get("backend", "ring") == "ring" and hostfile is None:
        names = [h for h in out.get("hosts", []) if not _dist.is_ip(h)]
        if names:
            raise ctx.error(
                f"key '{key}.hosts': the ring backend (mlx.launch's default without CUDA) needs "
                f"IP addresses, got {_show(names[0])}; use IPs or a hostfile with 'ips'",
                f"{key}.hosts",
            )
    return out


# --- the schema ---------------------------------------------------------------------------

# A data record (one JSONL line) longer than this is refused; reading stops there, so a
# 3 GB line or a device costs 64 MB at most, not all of the Mac's memory.
DEFAULT_MAX_RECORD_MB = 64
MAX_RECORD_MB_LIMIT = 4096
# Tokens in one micro-batch on one rank (batch_size / ranks x max_seq_length). Every token's
# activations are alive at once in the backward pass; past 2^20 (about a megabyte of
# activations per token even on a small model: a terabyte) no Mac holds the batch.
MAX_MICRO_BATCH_TOKENS = 2**20


_MLX, _ID, _LADDER = "mlx", "identity", "ladder"
# Relative, so it lands beside the config like any path the user wrote.
_DEFAULT_ADAPTER_PATH = "adapters"


def _f(
    default: Any,
    help: str,
    check: Check,
    kind: str,
    *roles: str,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A schema field; ``default`` MISSING makes it required.

    Roles: _MLX, mlx_lm.lora knows the key (it goes into adapter_config.json). _ID, changing
    it makes a different run whose checkpoints must not be mixed with this one's; ladder-able
    and operational knobs stay out, so a rung or a tweak keeps the progress. _LADDER, a
    ladder rung may override it.
    """
    metadata = {"help": help, "check": check, "kind": kind}
    metadata.update({role: role in roles for role in (_MLX, _ID, _LADDER)})
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class JobConfig:
    """A validated job config. Build it with :func:`load_config` or :func:`parse_config`;
    constructing it directly skips validation and path resolution."""

    # -- mlx_lm.lora keys, with mlx-lm's names and defaults --
    model: str = _f(
        MISSING, "Local model folder or Hugging Face repo id.", _local_or_hub, "path|repo",
        _MLX, _ID,
    )  # fmt: skip
    train: bool = _f(
        True, "Must be true: loractl always trains (kept for mlx-lm compatibility).", _train,
        "bool", _MLX,
    )  # fmt: skip
    test: bool = _f(False, "Evaluate on the test set after training.", _bool(), "bool", _MLX)
    test_batches: int = _f(
        500, "Number of test set batches, -1 uses the entire test set.", _int(1, also=(-1,)),
        "int", _MLX,
    )  # fmt: skip
    fine_tune_type: str = _f(
        "lora", "Type of fine-tuning: lora, dora or full.", _choice(("lora", "dora", "full")),
        "choice:lora|dora|full", _MLX, _ID,
    )  # fmt: skip
    optimizer: str = _f(
        "adam", "Optimizer: adam, adamw, muon, sgd or adafactor.",
        _choice(_OPTIMIZERS, fold_case=True), "choice:" + "|".join(_OPTIMIZERS), _MLX, _ID,
    )  # fmt: skip
    optimizer_config: dict[str, Any] = _f(
        MISSING, "Extra optimizer arguments by optimizer name, e.g. adamw: {weight_decay: 0.1}.",
        _optimizer_config, "mapping", _MLX, _ID, factory=dict,
    )  # fmt: skip
    data: str | None = _f(
        None, "Folder with {train,valid,test}.jsonl or a Hugging Face dataset id"
        " (required unless hf_dataset is set).", _local_or_hub, "path|repo", _MLX, _ID,
    )  # fmt: skip
    seed: int = _f(0, "The PRNG seed.", _int(), "int", _MLX, _ID)
    num_layers: int = _f(
        16, "Number of layers to fine-tune, -1 for all.", _int(1, also=(-1,)), "int",
        _MLX, _LADDER,
    )  # fmt: skip
    batch_size: int = _f(4, "Minibatch size.", _int(1), "int", _MLX, _LADDER)
    iters: int = _f(
        1000, "Iterations (minibatches) to train for; 'epochs' replaces it.", _int(1), "int",
        _MLX, _ID,
    )  # fmt: skip
    val_batches: int = _f(
        25, "Validation batches per evaluation, -1 for the whole set, 0 for none.",
        _int(0, also=(-1,)), "int", _MLX, _LADDER,
    )  # fmt: skip
    learning_rate: float = _f(
        1e-5, "Learning rate (lr_schedule replaces it).", _float(gt=0), "float", _MLX, _ID
    )
    # The three cadences below count iterations (minibatches), as mlx-lm's trainer does.
    steps_per_report: int = _f(
        10, "Iterations (minibatches) between loss reports.", _int(1), "int", _MLX
    )
    steps_per_eval: int = _f(
        200, "Iterations (minibatches) between validations.", _int(1), "int", _MLX, _LADDER
    )
    resume_adapter_file: str | None = _f(
        None, "Adapter weights to start from.", _existing_file, "path?", _MLX, _ID
    )
    adapter_path: str = _f(
        _DEFAULT_ADAPTER_PATH, "Folder for the final adapters and adapter_config.json.",
        _output_path, "path", _MLX,
    )  # fmt: skip
    save_every: int = _f(
        100, "Save the adapters every N iterations, also as <N>_adapters.safetensors, as"
        " mlx-lm does.", _int(1), "int", _MLX,
    )  # fmt: skip
    max_seq_length: int = _f(2048, "Maximum sequence length.", _int(2), "int", _MLX, _LADDER)
    grad_checkpoint: bool = _f(
        False, "Use gradient checkpointing to reduce memory use.", _bool(), "bool",
        _MLX, _LADDER,
    )  # fmt: skip
    grad_accumulation_steps: int = _f(
        1, "Minibatches to accumulate before each optimizer update.", _int(1), "int",
        _MLX, _LADDER,
    )  # fmt: skip
    clear_cache_threshold: int = _f(
        0, "Clear the MLX cache after an iteration when it holds more than this many bytes"
        " ('2GB' works); 0: after every iteration, as in mlx-lm.", _size, "size", _MLX,
    )  # fmt: skip
    lr_schedule: dict[str, Any] | None = _f(
        None, "Learning-rate schedule: {name, arguments, warmup, warmup_init}.", _lr_schedule,
        "mapping?", _MLX, _ID,
    )  # fmt: skip
    # In the identity minus rank, and on a rung rank only (the supervisor converts by SVD).
    lora_parameters: LoraParameters = _f(
        MISSING, "LoRA settings: rank, scale, dropout, keys.", _lora_parameters, "mapping",
        _MLX, _ID, _LADDER, factory=LoraParameters,
    )  # fmt: skip
    mask_prompt: bool = _f(
        False, "Mask the prompt in the loss when training.", _bool(), "bool", _MLX, _ID
    )
    report_to: str | None = _f(
        None, "Services to report to: 'wandb', 'swanlab' or 'wandb,swanlab'.", _report_to,
        "str?", _MLX,
    )  # fmt: skip
    project_name: str | None = _f(
        None, "Project name for reporting.", _str(optional=True), "str?", _MLX
    )
    trust_remote_code: bool = _f(
        False, "Trust remote code when loading the model and tokenizer.", _bool(), "bool", _MLX
    )
    hf_dataset: dict[str, Any] | list[dict[str, Any]] | None = _f(
        None, "Hugging Face dataset(s) with a feature mapping; replaces 'data'.", _hf_dataset,
        "mapping|list?", _MLX, _ID,
    )  # fmt: skip
    prompt_feature: str = _f("prompt", "Prompt key in completions data.", _str(), "str", _MLX, _ID)
    completion_feature: str = _f(
        "completion", "Completion key in completions data.", _str(), "str", _MLX, _ID
    )
    chat_feature: str = _f("messages", "Messages key in chat data.", _str(), "str", _MLX, _ID)
    text_feature: str = _f("text", "Text key in text data.", _str(), "str", _MLX, _ID)
    wandb: str | None = _f(
        None, "Legacy mlx-lm key (a wandb project), ignored as mlx-lm ignores it now; use"
        " report_to and project_name.", _str(optional=True), "str?", _MLX,
    )  # fmt: skip

    # -- loractl's own keys --
    name: str = _f("job", "Job name; defaults to the config file's stem.", _name, "str")
    priority: int = _f(
        0, "Scheduling priority, -100..100; higher runs first.", _int(-100, 100), "int"
    )
    epochs: int | None = _f(
        None, "Passes over the training set (less its last len % batch_size examples, which"
        " mlx-lm's batching leaves out); when set it replaces iters as the run length.",
        _int(1, optional=True), "int?", _ID,
    )  # fmt: skip
    memory_budget_mb: int | None = _f(
        None, "Most memory the trainer may use, in MB (memory_budget_gb also accepted);"
        " null: a share of physical RAM.", _int(64, optional=True), "int?",
    )  # fmt: skip
    preflight: bool = _f(
        True, "Before the first optimizer step of every attempt, run forward and backward on"
        " the longest batch (and evaluation on the longest validation batch) and stop at once"
        " if the peak is over the memory budget; false starts training at once.", _bool(),
        "bool",
    )  # fmt: skip
    ladder: list[dict[str, Any]] | str | None = _f(
        None, "Fallback rungs, each a partial override, taken one per memory crash;"
        " null: the default ladder, 'auto': built from the job (gradient checkpointing, batch"
        " into accumulation, then sequence length, layers, rank), []: none.", _ladder, "list?",
    )  # fmt: skip
    checkpoint_every: int | None = _f(
        None, "Checkpoint every N optimizer steps; null: save_every / grad_accumulation_steps.",
        _int(1, optional=True), "int?",
    )  # fmt: skip
    keep_checkpoints: int = _f(3, "How many recent checkpoints to keep.", _int(1), "int")
    max_retries: int = _f(
        3, "Restarts allowed per ladder rung (reset whenever a checkpoint advances).",
        _int(0), "int",
    )  # fmt: skip
    heartbeat_interval: float = _f(
        1.0, "Seconds between trainer heartbeats.", _float(gt=0), "float"
    )
    heartbeat_timeout: float = _f(
        30.0, "Seconds without a heartbeat before the trainer counts as hung.", _float(gt=0),
        "float",
    )  # fmt: skip
    startup_timeout: float | None = _f(
        None, "Seconds from launch until the trainer, or every rank of a distributed job, has"
        " sent its first heartbeat; a rank that has not is a start-up failure naming its host."
        " null: heartbeat_timeout for a distributed job (counted once its hosts answer ssh),"
        " 300 for one trainer.", _float(gt=0, optional=True), "float?",
    )  # fmt: skip
    host_unreachable_minutes: float = _f(
        30.0, "A distributed job whose remote host has not answered ssh for this many minutes"
        " pauses, naming the host, instead of trying on through the night.", _float(gt=0),
        "float",
    )  # fmt: skip
    cleanup_every: int = _f(
        10, "Run gc and mx.clear_cache every N optimizer steps.", _int(1), "int"
    )
    low_memory_mb: int = _f(
        1024, "Also clean up whenever available memory drops below this many MB.", _int(0),
        "int",
    )  # fmt: skip
    notify: bool = _f(False, "Send a desktop notification when the job ends.", _bool(), "bool")
    # Not an identity field itself: only the world size it implies is (see identity_hash), so
    # moving a job to other hosts or ports keeps its checkpoints.
    distributed: dict[str, Any] | None = _f(
        None, "Run on several processes through mlx.launch: backend, hosts, hostfile,"
        " processes (mlx.launch's -n), env, starting_port; null: one process.", _distributed,
        "mapping?",
    )  # fmt: skip
    max_processes_per_host: int | None = _f(
        None, "Most ranks 'distributed' may start on one host; null: this machine's CPU cores."
        " Each rank is a whole trainer with its own copy of the model, so more ranks than"
        " cores only contend.", _int(1, optional=True), "int?",
    )  # fmt: skip
    max_record_mb: int = _f(
        DEFAULT_MAX_RECORD_MB, "Longest line (one record) of a data file, in MB; a longer one is"
        " bad data named by file and line, read no further than this.",
        _int(1, MAX_RECORD_MB_LIMIT), "int",
    )  # fmt: skip

    def __post_init__(self) -> None:
        # Not fields (they stay out of to_dict, equality and the identity): what loading
        # noticed but did not refuse (keys mlx_lm.lora would ignore), one line each, for the
        # CLI, the supervisor and the trainer to show; and the folder the config was loaded
        # from, against which with_overrides resolves an override's relative paths.
        self.warnings: list[str] = []
        self._base_dir: str | None = None

    # -- derived values --

    @property
    def checkpoint_interval(self) -> int:
        """Optimizer steps between checkpoints."""
        if self.checkpoint_every is not None:
            return self.checkpoint_every
        # save_every counts minibatches (mlx-lm's iterations); checkpoints sit on optimizer
        # steps, so convert.
        return max(1, self.save_every // self.grad_accumulation_steps)

    def total_examples(self, train_len: int) -> int:
        """Training examples the whole run consumes, given the examples in one epoch (the
        training set less the remainder that batching leaves out).

        Call it on the submitted config, not a rung's: a rung that shrinks batch_size must
        not shorten the run.
        """
        if self.epochs is not None:
            return self.epochs * train_len
        return self.iters * self.batch_size

    @property
    def world_size(self) -> int:
        """How many ranks the job runs on: 1 unless ``distributed`` says otherwise."""
        return _dist.world_size(self.distributed)

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-safe data (a deep copy)."""
        return dataclasses.asdict(self)

    def with_overrides(
        self,
        override: Mapping[str, Any],
        source: str = "override",
        *,
        base_dir: str | Path | None = None,
    ) -> JobConfig:
        """A new config with ``override`` deep-merged in and everything re-validated.

        Relative paths in the override resolve against ``base_dir``, by default the folder
        the config was loaded from.
        """
        if not isinstance(override, Mapping):
            raise ConfigError(
                f"expected a mapping of overrides, got {_show(override)}", source=source
            )
        base = base_dir if base_dir is not None else self._base_dir or os.getcwd()
        merged = _merge(self.to_dict(), dict(override))
        out = parse_config(merged, Path(base), source, default_name=self.name)
        # The merged dict re-states this config's own keys; only the override's keys are news.
        fresh = [w for w in out.warnings if any(f"key '{key}'" in w for key in override)]
        out.warnings = [*self.warnings, *fresh]
        return out

    def identity_hash(self) -> str:
        """sha256 of what makes this run this run; equal hashes may share checkpoints."""
        payload = {}
        for f in dataclasses.fields(self):
            if not f.metadata[_ID]:
                continue
            value = getattr(self, f.name)
            if isinstance(value, LoraParameters):
                value = {
                    k: v for k, v in dataclasses.asdict(value).items() if k not in _LADDER_LORA_KEYS
                }
            payload[f.name] = value
        # Each rank reads its own shard of every batch, so a checkpoint resumed on another
        # number of ranks would train on other data; single-process hashes stay as they were.
        if self.world_size > 1:
            payload["world_size"] = self.world_size
        blob = json.dumps(
            {"loractl_config_identity": 1, "fields": payload},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        )
        return hashlib.sha256(blob.encode("ascii")).hexdigest()

    def effective_ladder(self) -> list[dict[str, Any]]:
        """The rungs to step down through: the config's own, else the default recipe."""
        if self.ladder is None:
            rungs = default_ladder(self)
        elif isinstance(self.ladder, str):  # AUTO_LADDER, the one string the schema allows
            rungs = auto_ladder(self)
        else:
            rungs = list(self.ladder)
        copied: list[dict[str, Any]] = json.loads(json.dumps(rungs))
        return copied

    def mlx_lm_args(self) -> dict[str, Any]:
        """The mlx_lm.lora keys only, shaped as mlx-lm writes adapter_config.json."""
        everything = self.to_dict()
        out = {f.name: everything[f.name] for f in dataclasses.fields(self) if f.metadata[_MLX]}
        lora = out["lora_parameters"]
        if lora.get("keys") is None:
            lora.pop("keys", None)
        if self.fine_tune_type == "full":
            # mlx-lm itself drops lora_parameters for a full fine-tune before saving.
            out["lora_parameters"] = None
        return out


LADDER_KEYS: frozenset[str] = frozenset(
    f.name for f in dataclasses.fields(JobConfig) if f.metadata[_LADDER]
)
_FIELDS = {f.name: f for f in dataclasses.fields(JobConfig)}
_REQUIRED = tuple(
    f.name
    for f in dataclasses.fields(JobConfig)
    if f.default is MISSING and f.default_factory is MISSING
)

# Keys people bring from older mlx-lm versions or other LoRA tools.
_TOP_LEVEL_HINTS = {
    "lora_layers": "mlx-lm renamed it 'num_layers'",
    "use_dora": "use 'fine_tune_type: dora'",
    "rank": "it belongs under 'lora_parameters'",
    "scale": "it belongs under 'lora_parameters'",
    "dropout": "it belongs under 'lora_parameters'",
    "alpha": "mlx-lm uses 'lora_parameters.scale', roughly alpha / rank",
    "memory_budget": "use 'memory_budget_mb' or 'memory_budget_gb'",
}
# DESIGN.md names the budget in GB; the schema stores MB, so both spellings load.
_ALIASES = ("memory_budget_gb",)


class FieldInfo(NamedTuple):
    name: str
    kind: str  # int, float, bool, str, path, size, mapping, list, choice:a|b; '?' = nullable
    default: Any  # dataclasses.MISSING for a required field
    help: str


def iter_fields() -> list[FieldInfo]:
    """The top-level schema, for generating CLI options and docs."""
    out = []
    for f in dataclasses.fields(JobConfig):
        if f.default_factory is not MISSING:
            default = f.default_factory()
            if isinstance(default, LoraParameters):
                default = dataclasses.asdict(default)
        else:
            default = f.default
        out.append(FieldInfo(f.name, f.metadata["kind"], default, f.metadata["help"]))
    return out


# --- merging, defaults ---------------------------------------------------------------------

# Mappings that merge key by key; anything else (lr_schedule, hf_dataset, ladder) is one unit
# and an override replaces it whole.
_MERGED = ("lora_parameters", "optimizer_config")


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    if "memory_budget_gb" in override:
        out.pop("memory_budget_mb", None)
    if "memory_budget_mb" in override:
        out.pop("memory_budget_gb", None)
    for key, value in override.items():
        if key in _MERGED and isinstance(out.get(key), Mapping) and isinstance(value, Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it, as a new dict: where both hold a mapping
    under a key they merge key by key, at any depth; any other value in ``override``
    replaces ``base``'s whole. Neither argument changes."""
    out = dict(base)
    for key, value in override.items():
        current = out.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            out[key] = deep_merge(current, value)
        else:
            out[key] = value
    return out


def default_ladder(cfg: JobConfig) -> list[dict[str, Any]]:
    """The recipe's fallbacks: halve accumulation, then sequence length, then LoRA rank,
    skipping a rung that cannot halve (or, for rank, a full fine-tune that has none)."""
    rungs: list[dict[str, Any]] = []
    if cfg.grad_accumulation_steps > 1:
        rungs.append({"grad_accumulation_steps": cfg.grad_accumulation_steps // 2})
    if cfg.max_seq_length > 32:
        rungs.append({"max_seq_length": cfg.max_seq_length // 2})
    if cfg.fine_tune_type != "full" and cfg.lora_parameters.rank > 1:
        rungs.append({"lora_parameters": {"rank": cfg.lora_parameters.rank // 2}})
    return rungs


def auto_ladder(cfg: JobConfig) -> list[dict[str, Any]]:
    """`ladder: auto`: the steps that save memory for this job, cheapest to the result first.

    First what keeps the effective batch and the model: gradient checkpointing, then the batch
    halved into twice the accumulation (down to one example per rank). Then what changes the
    run: the sequence length halved (twice, not below 64), the trained layers halved, the
    LoRA rank halved. Accumulation alone is never a rung: at the same batch size it saves
    nothing (measured: 0%). Each step applies on top of the ones before it, as every ladder's
    rungs do; the supervisor's memory model then skips a rung predicted to save too little.
    """
    rungs: list[dict[str, Any]] = []
    if not cfg.grad_checkpoint:
        rungs.append({"grad_checkpoint": True})
    world = max(cfg.world_size, 1)
    batch, accumulation = cfg.batch_size, cfg.grad_accumulation_steps
    while batch // 2 >= world and (batch // 2) % world == 0 and batch % 2 == 0:
        batch, accumulation = batch // 2, accumulation * 2
        rungs.append({"batch_size": batch, "grad_accumulation_steps": accumulation})
    seq = cfg.max_seq_length
    for _ in range(2):
        if seq // 2 < 64:
            break
        seq //= 2
        rungs.append({"max_seq_length": seq})
    if cfg.num_layers > 1:
        rungs.append({"num_layers": cfg.num_layers // 2})
    if cfg.fine_tune_type != "full" and cfg.lora_parameters.rank > 1:
        rungs.append({"lora_parameters": {"rank": cfg.lora_parameters.rank // 2}})
    return rungs


# --- parsing -------------------------------------------------------------------------------


def _default_name(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).lstrip(".-")[:64]
    return name or "job"


def parse_config(
    data: Mapping[str, Any],
    base_dir: str | Path,
    source: str = "<config>",
    *,
    default_name: str = "job",
) -> JobConfig:
    """Validate a config mapping; relative paths resolve against ``base_dir``."""
    base = os.path.abspath(os.fspath(base_dir))
    ctx = _Ctx(source, base)
    if not isinstance(data, Mapping):
        raise ctx.error(f"the top level must be a mapping of keys to values, got {_kind(data)}")
    for key in data:
        if not isinstance(key, str):
            raise ctx.error(f"keys must be strings, got {_show(key)}")
    warnings: list[str] = []
    for key in data:
        if key in _FIELDS or key in _ALIASES:
            continue
        if key in _TOP_LEVEL_HINTS:
            raise ctx.unknown(key, (), _TOP_LEVEL_HINTS[key])
        if near := _near_miss(key, [*_FIELDS, *_ALIASES]):
            raise ctx.unknown(key, (), f"did you mean '{near}'?")
        # mlx_lm.lora copies every key of its config into its arguments and reads only the
        # ones it knows, so configs written for other tools (the mlx-lm-lora fork's
        # train_mode, beta, ...) train there; they train here too, with a word about it.
        warnings.append(
            f"{source}: key '{key}' is not an mlx_lm.lora or loractl key; ignored"
            " (mlx_lm.lora ignores it too)"
        )
    if data.get("wandb") is not None:
        warnings.append(
            f"{source}: key 'wandb' is ignored, as mlx_lm.lora ignores it since it gained"
            " report_to; use 'report_to: wandb' and 'project_name' to report to wandb"
        )

    values: dict[str, Any] = {}
    for key, value in data.items():
        # mlx_lm.lora treats a null value as "not set" and applies its default; loractl does
        # the same so its configs (and an override of null) mean what they mean there.
        if key in _FIELDS and value is not None:
            values[key] = _FIELDS[key].metadata["check"](value, key, ctx)
    if data.get("memory_budget_gb") is not None:
        if data.get("memory_budget_mb") is not None:
            raise ctx.error(
                "keys 'memory_budget_mb' and 'memory_budget_gb' both set; keep one",
                "memory_budget_gb",
            )
        gb = _float(ge=64 / 1024)(data["memory_budget_gb"], "memory_budget_gb", ctx)
        values["memory_budget_mb"] = round(gb * 1024)

    for key in _REQUIRED:
        if key not in values:
            raise ctx.error(f"missing required key '{key}'", key)
    if values.get("data") is None and values.get("hf_dataset") is None:
        raise ctx.error("missing required key 'data' (or 'hf_dataset')", "data")
    if values.get("test") and values.get("hf_dataset") is not None:
        entries = values["hf_dataset"]
        for i, entry in enumerate(entries if isinstance(entries, list) else [entries]):
            if "test_split" not in entry:
                # mlx-lm would call datasets.load_dataset(split=None) and fail obscurely.
                where = f"hf_dataset[{i}]" if isinstance(entries, list) else "hf_dataset"
                raise ctx.error(
                    f"key '{where}': 'test: true' needs a 'test_split' here (e.g. 'test')",
                    f"{where}.test_split",
                )
    values.setdefault("name", default_name)
    # The default adapter folder is relative too, and must land beside the config like any
    # path the user wrote.
    values.setdefault("adapter_path", _resolve(_DEFAULT_ADAPTER_PATH, base))

    cfg = JobConfig(**values)
    _check_world(cfg, ctx)
    _check_micro_batch(cfg, ctx)
    _check_data_files(cfg, ctx)
    if cfg.heartbeat_timeout <= cfg.heartbeat_interval:
        raise ctx.error(
            f"key 'heartbeat_timeout': must be greater than heartbeat_interval"
            f" ({cfg.heartbeat_interval:g}), got {cfg.heartbeat_timeout:g}",
            "heartbeat_timeout",
        )
    cfg._base_dir = base
    cfg.warnings = warnings
    return cfg


def _ranks_per_host(section: Mapping[str, Any]) -> dict[str, int]:
    """How many ranks ``distributed`` starts on each host."""
    if section.get("hostfile"):
        names = [str(h.get("ssh")) for h in _dist.hostfile_hosts(section["hostfile"])]
        per = 1
    else:
        names = list(section.get("hosts") or [_dist.DEFAULT_HOST])
        per = int(section.get("processes") or 1)
    return {name: names.count(name) * per for name in dict.fromkeys(names)}


# Ranks on another Mac are held to this (its cores are not known here): an M-series Ultra
# has 32 cores, so more than 64 ranks on one host is a typo.
MAX_REMOTE_RANKS_PER_HOST = 64
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _is_this_machine(host: str) -> bool:
    import socket

    return host in _LOOPBACK or host == socket.gethostname()


def _check_micro_batch(cfg: JobConfig, ctx: _Ctx) -> None:
    """A micro-batch no Mac can hold is a typo, not a job: refuse it at submit."""
    per_rank = -(-cfg.batch_size // max(cfg.world_size, 1))
    tokens = per_rank * cfg.max_seq_length
    if tokens > MAX_MICRO_BATCH_TOKENS:
        ranks = f" / {cfg.world_size} ranks" if cfg.world_size > 1 else ""
        raise ctx.error(
            f"key 'batch_size': {cfg.batch_size}{ranks} x max_seq_length {cfg.max_seq_length}"
            f" is {tokens} tokens in one micro-batch, over the {MAX_MICRO_BATCH_TOKENS} that"
            " any Mac's memory can hold (every token's activations are alive at once);"
            " lower batch_size or max_seq_length, and use grad_accumulation_steps for a"
            " larger effective batch",
            "batch_size",
        )


def _check_world(cfg: JobConfig, ctx: _Ctx) -> None:
    """Every rank takes batch_size / world_size examples of each batch, as in mlx-lm."""
    world = cfg.world_size
    if world == 1:
        return
    if cfg.batch_size % world:
        raise ctx.error(
            f"key 'batch_size': {cfg.batch_size} is not divisible by the {world} ranks of"
            " 'distributed'; each rank takes an equal share of every batch",
            "batch_size",
        )
    for index, rung in enumerate(cfg.effective_ladder()):
        if "batch_size" in rung and rung["batch_size"] % world:
            raise ctx.error(
                f"key 'ladder[{index}].batch_size': {rung['batch_size']} is not divisible by"
                f" the {world} ranks of 'distributed'",
                f"ladder[{index}].batch_size",
            )
    assert cfg.distributed is not None  # a world of several ranks comes from this section
    cores = os.cpu_count() or 1
    for host, ranks in _ranks_per_host(cfg.distributed).items():
        if cfg.max_processes_per_host:
            limit = cfg.max_processes_per_host
            why = f"over max_processes_per_host ({limit})"
        elif _is_this_machine(host):
            limit, why = cores, f"but this machine has {cores} CPU cores"
        else:
            limit = max(cores, MAX_REMOTE_RANKS_PER_HOST)
            why = f"over {limit} (no Mac has that many CPU cores)"
        if ranks > limit:
            raise ctx.error(
                f"key 'distributed.processes': {ranks} ranks on host {host}, {why}; each rank"
                " is a whole trainer with its own copy of the model, so more ranks than cores"
                " only contend (max_processes_per_host raises the limit)",
                "distributed.processes",
            )


class _YamlLoader(yaml.SafeLoader):
    """Safe loader that reads numbers like mlx-lm does and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        # PyYAML keeps the last of two equal keys silently; in a config that hides a typo'd
        # edit. Merge keys ('<<') legitimately repeat what they merge, so they are skipped.
        seen: set[tuple[str, Any]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(ident)
        return super().construct_mapping(node, deep)


# YAML 1.1 reads "1e-5" (no dot) as a string; mlx_lm.lora adds this resolver to the global
# SafeLoader so its configs mean a float there. Registering it on a subclass keeps loractl's
# reading identical without touching anybody else's yaml.safe_load.
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        """^(?:
     [-+]?(?:[0-9][0-9_]*)\\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\\.[0-9_]*
    |[-+]?\\.(?:inf|Inf|INF)
    |\\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "invalid YAML"
        if "\\t" in problem or "\t" in problem:
            problem += " (YAML does not allow tabs for indentation; use spaces)"
        if "constructor for the tag" in problem:
            problem += " (loractl reads YAML with the safe loader: plain data only)"
        # An unclosed bracket is reported where the file ends; where it opened helps more.
        if e.context and e.context_mark and e.problem_mark:
            if e.context_mark.line != e.problem_mark.line:
                problem += f", {e.context} opened on line {e.context_mark.line + 1}"
        raise ConfigError(
            f"YAML error: {problem}",
            source=source,
            line=mark.line + 1 if mark else None,
            column=mark.column + 1 if mark else None,
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"YAML error: {e}", source=source) from None


_TOML_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _parse_toml(text: str, source: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        if match := _TOML_AT.search(message):
            raise ConfigError(
                f"TOML error: {message[: match.start()]}",
                source=source,
                line=int(match.group(1)),
                column=int(match.group(2)),
            ) from None
        raise ConfigError(f"TOML error: {message}", source=source) from None


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_json_pairs)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"JSON error: {e.msg}", source=source, line=e.lineno, column=e.colno
        ) from None
    except ValueError as e:
        raise ConfigError(f"JSON error: {e}", source=source) from None


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    ".yaml": _parse_yaml,
    ".yml": _parse_yaml,
    ".toml": _parse_toml,
    ".json": _parse_json,
}


def _read_text(path: Path, source: str) -> str:
    try:
        info = os.stat(path)
        # A FIFO or device would block or never end; only regular files are configs.
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("not a regular file", source=source)
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"file is {info.st_size} bytes; configs are limited to {MAX_CONFIG_BYTES}",
                source=source,
            )
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read the file: {e.strerror or e}", source=source) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"file is over {MAX_CONFIG_BYTES} bytes, the limit for a config", source=source
        )
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise ConfigError("binary data (NUL byte), not a text config", source=source, line=line)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"not valid UTF-8 text (byte 0x{raw[e.start]:02x})", source=source, line=line
        ) from None


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> JobConfig:
    """Load and validate a job config file (.yaml/.yml, .toml or .json).

    ``overrides`` are merged over the file's values before validation; relative paths in
    both resolve against the file's folder.
    """
    path = Path(path)
    source = str(path)
    parser = _PARSERS.get(path.suffix.lower())
    if parser is None:
        raise ConfigError(
            f"unsupported config file type {path.suffix or '(no suffix)'!r};"
            " use .yaml, .yml, .toml or .json",
            source=source,
        )
    text = _read_text(path, source)
    if not text.strip():
        raise ConfigError("the file is empty", source=source)
    try:
        data = parser(text, source)
    except RecursionError:
        raise ConfigError("the file is nested too deeply", source=source) from None
    if data is None:
        raise ConfigError("the file is empty (only comments)", source=source)
    if not isinstance(data, dict):
        raise ConfigError(
            f"the top level must be a mapping of keys to values, got {_kind(data)}", source=source
        )
    if overrides:
        data = _merge(data, overrides)
    return parse_config(
        data,
        os.path.dirname(os.path.abspath(path)),
        source,
        default_name=_default_name(path.stem),
    )


def load_job(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> JobConfig:
    """:func:`load_config`, or with no file (``loractl train --model M --data D``) the job the
    command line's ``overrides`` alone describe, its relative paths from the current folder,
    as mlx_lm.lora reads its flags."""
    if path is not None:
        return load_config(path, overrides)
    return parse_config(dict(overrides or {}), os.getcwd(), "the command line")


def sets_key(path: str | Path, key: str) -> bool:
    """Whether the config file itself sets ``key`` (not a default): ``train: true`` makes
    ``--test`` test after training, as it does for mlx_lm.lora."""
    path = Path(path)
    parser = _PARSERS.get(path.suffix.lower())
    if parser is None:
        return False
    try:
        data = parser(_read_text(path, str(path)), str(path))
    except ConfigError:
        return False
    return isinstance(data, dict) and data.get(key) is not None
