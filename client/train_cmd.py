"""`loractl train`: built on demand, because its flags come from the job schema and loading
the schema costs milliseconds that `loractl status` must not pay.

The training itself runs in ``python -m loractl.daemon.trainer``, a child of this
interpreter, exactly as the supervisor runs it: the client never imports the trainer's side.
Its output goes straight to the terminal, signals reach it as they would reach a trainer run
by hand, and its exit code is this command's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import click
import yaml

from loractl.client.render import emit
from loractl.protocol import ExitCode


def parse_assignments(assignments: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` pairs (YAML values, dotted keys for nesting) into an overrides mapping."""
    overrides: dict = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise click.BadParameter(f"{key}: {exc}", param_hint="--set") from None
        target = overrides
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return overrides


SCALAR_KINDS = ("int", "float", "bool", "str", "size", "path", "choice")
# Keys that make no sense as a flag on `train` (the trainer always trains).
NOT_FLAGS = frozenset({"train"})


def schema_flags() -> list:
    """Fields of the job schema that `loractl train` exposes as flags, with their help text."""
    from loractl.config import iter_fields

    return [
        info
        for info in iter_fields()
        if info.name not in NOT_FLAGS
        and info.kind.rstrip("?").split(":")[0].split("|")[0] in SCALAR_KINDS
    ]


def schema_options(command):
    """Add one option per scalar schema field; values are validated by the schema, not here."""
    for info in reversed(schema_flags()):
        flag = info.name.replace("_", "-")
        if info.kind.startswith("bool"):
            option = click.option(f"--{flag}/--no-{flag}", info.name, default=None, help=info.help)
        else:
            option = click.option(
                f"--{flag}", info.name, default=None, metavar=info.kind.upper(), help=info.help
            )
        command = option(command)
    return command


def overrides_from_flags(values: dict) -> dict:
    """Flag values (strings, parsed as YAML scalars) into config overrides."""
    kinds = {info.name: info.kind for info in schema_flags()}
    overrides = {}
    for name, value in values.items():
        if value is None or name not in kinds:
            continue
        if isinstance(value, str):
            kind = kinds[name]
            if kind.startswith("path") and Path(value).expanduser().exists():
                # A path typed on the command line is relative to where the user stands.
                value = str(Path(value).expanduser().resolve())
            elif not kind.startswith(("str", "path", "choice")):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    pass  # left as a string, so the schema names the key in its error
        overrides[name] = value
    return overrides


def run_length_flags(overrides: dict) -> dict:
    """A run-length flag replaces the config's other way of saying the run's length.

    ``epochs`` wins over ``iters`` when both are in the config, so ``--iters 8`` on a config
    with ``epochs: 3`` would otherwise change nothing.
    """
    out = dict(overrides)
    if out.get("iters") is not None and "epochs" not in out:
        out["epochs"] = None
    return out


@click.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-c",
    "--config",
    "config_option",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The job config, as mlx_lm.lora -c takes it (same as the CONFIG argument).",
)
@click.option("--fresh", is_flag=True, help="Ignore existing checkpoints and start over.")
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key (dotted for nested keys, e.g. lora_parameters.rank=4).",
)
@click.option(
    "--train",
    "train_flag",
    is_flag=True,
    help="Train (loractl always does; accepted as mlx_lm.lora takes it). With --test: train, "
    "then test.",
)
@click.option("--telemetry", hidden=True, help="Supervisor telemetry endpoint.")
@click.option("--job-id", hidden=True, default="")
@click.option("--attempt", hidden=True, type=int, default=0)
@click.option("--rung", hidden=True, type=int, default=0)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@schema_options
def train(
    config,
    config_option,
    fresh,
    assignments,
    train_flag,
    telemetry,
    job_id,
    attempt,
    rung,
    as_json,
    **flags,
) -> None:
    """Train CONFIG in the foreground, resuming from its newest valid checkpoint.

    Every flag overrides the config's key of the same name, as mlx_lm.lora's flags do, and
    with no config the flags are the job (`loractl train --model M --data D --iters 100`).
    `--test` without `--train` (and without `train: true` in the config) trains nothing: it
    evaluates the adapters in adapter_path on test.jsonl, as mlx_lm.lora does. SIGTERM or
    Ctrl-C finishes the current step, writes a checkpoint and exits; running the same command
    again continues exactly where it stopped.
    """
    from loractl.config import sets_key

    if config is not None and config_option is not None and config != config_option:
        raise click.UsageError(f"two configs given: {config} and -c {config_option}")
    path = config or config_option
    if path is None and not flags.get("model"):
        raise click.UsageError(
            "no config given: pass CONFIG, -c CONFIG, or --model M --data D (and any flags)"
        )
    settings = run_length_flags({**overrides_from_flags(flags), **parse_assignments(assignments)})
    test_only = (
        flags.get("test") is True
        and not train_flag
        and not (path is not None and sets_key(path, "train"))
    )
    argv = trainer_argv(
        path,
        test_only=test_only,
        fresh=fresh,
        settings=settings,
        telemetry=telemetry,
        job_id=job_id,
        attempt=attempt,
        rung=rung,
    )
    # With --json the progress bar gives way to plain lines, as for a supervised trainer:
    # the child's stderr is a pipe, relayed here.
    code = run_trainer(argv, relay_stderr=as_json)
    if as_json:
        emit({"exit_code": code, "outcome": outcome_name(code)}, as_json=True)
    finish(code)


def trainer_argv(
    config: Path | None,
    *,
    test_only: bool = False,
    fresh: bool = False,
    settings: dict | None = None,
    telemetry: str | None = None,
    job_id: str = "",
    attempt: int = 0,
    rung: int = 0,
) -> list[str]:
    """The trainer's command line, as ``python -m loractl.daemon.trainer`` takes it."""
    argv = [sys.executable, "-m", "loractl.daemon.trainer"]
    if config is not None:
        argv.append(str(config))
    if test_only:
        argv.append("--test-only")
    if fresh:
        argv.append("--fresh")
    if telemetry:
        argv += ["--telemetry", telemetry]
    if job_id:
        argv += ["--job-id", job_id]
    if attempt:
        argv += ["--attempt", str(attempt)]
    if rung:
        argv += ["--rung", str(rung)]
    if settings:
        # default=str: a YAML date typed with --set reaches the schema as text, to be judged.
        argv += ["--settings", json.dumps(settings, default=str)]
    return argv


def _from_terminal() -> bool:
    """Whether we are in the terminal's foreground process group: a ^C there reaches the
    trainer (our child, in the same group) by itself."""
    for stream in (sys.stdin, sys.stderr, sys.stdout):
        try:
            return os.tcgetpgrp(stream.fileno()) == os.getpgrp()
        except (OSError, ValueError, AttributeError):
            continue
    return False


def run_trainer(argv: list[str], *, relay_stderr: bool = False) -> int:
    """Run the trainer to its end and return its exit status (negative: killed by that
    signal). SIGTERM, and a SIGINT not sent by the terminal, are passed on to it: the
    trainer finishes its step, writes a checkpoint and exits 82; a second one means now."""
    proc = subprocess.Popen(
        argv, stderr=subprocess.PIPE if relay_stderr else None, text=True, errors="replace"
    )

    def forward(signum, _frame):
        if signum == signal.SIGINT and _from_terminal():
            return  # the terminal sent it to the whole group, the trainer included
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if relay_stderr:
            for line in proc.stderr:
                sys.stderr.write(line)
                sys.stderr.flush()
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def outcome_name(code: int) -> str:
    """The trainer's exit status in words: ``done``, ``stopped``, ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    try:
        return ExitCode(code).name.lower()
    except ValueError:
        return f"exit {code}"


def finish(code: int) -> None:
    """Exit as the trainer did: with its code, or killed by the signal that killed it."""
    if code < 0:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL and SIGSTOP keep their default anyway
            pass
        os.kill(os.getpid(), -code)
        code = 128 - code  # a signal that does not end a process by default
    sys.exit(code)
