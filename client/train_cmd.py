"""`loractl train`: built on demand, because its flags come from the job schema and loading
the schema costs milliseconds that `loractl status` must not pay."""

from __future__ import annotations

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
@click.option("--telemetry", hidden=True, help="Supervisor telemetry endpoint.")
@click.option("--job-id", hidden=True, default="")
@click.option("--attempt", hidden=True, type=int, default=0)
@click.option("--rung", hidden=True, type=int, default=0)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@schema_options
def train(
    config, config_option, fresh, assignments, telemetry, job_id, attempt, rung, as_json, **flags
) -> None:
    """Train CONFIG in the foreground, resuming from its newest valid checkpoint.

    Every flag overrides the config's key of the same name, as mlx_lm.lora's flags do.
    SIGTERM or Ctrl-C finishes the current step, writes a checkpoint and exits; running the
    same command again continues exactly where it stopped.
    """
    if config is None and config_option is None:
        raise click.UsageError("no config given: pass CONFIG or -c CONFIG")
    if config is not None and config_option is not None and config != config_option:
        raise click.UsageError(f"two configs given: {config} and -c {config_option}")
    from loractl.daemon.trainer import run

    settings = run_length_flags({**overrides_from_flags(flags), **parse_assignments(assignments)})
    code = run(
        config or config_option,
        fresh=fresh,
        settings=settings,
        telemetry_endpoint=telemetry,
        job_id=job_id,
        attempt=attempt,
        rung=rung,
        show_progress=None if not as_json else False,
    )
    if as_json:
        emit({"exit_code": int(code), "outcome": ExitCode(code).name.lower()}, as_json=True)
    sys.exit(int(code))
