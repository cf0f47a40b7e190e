"""The ``loractl`` command line: a thin click layer.

Each command parses its options, calls one plain function and hands the result to a renderer
(``render.py``). Nothing here imports mlx at module level: ``loractl status`` has to answer in
well under 150 ms, so the trainer's heavy imports happen only inside the commands that train.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml

from loractl import __version__
from loractl.client.render import emit, fail
from loractl.paths import Layout
from loractl.protocol import PROTOCOL_VERSION, ClientExit, ErrorCode, ExitCode


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loractl")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="LORACTL_HOME",
    help="loractl's state folder (default: per platform; env LORACTL_HOME).",
)
@click.pass_context
def main(ctx, home) -> None:
    """Run LoRA fine-tuning on MLX that survives the night."""
    ctx.obj = Layout.at(home)


def call(ctx, message, as_json: bool, timeout: float = 5.0):
    """Send a request; turn every failure into one line and a named exit code."""
    from loractl.client.control import DaemonNotRunning, RequestFailed, request

    try:
        return request(ctx.obj, message, timeout=timeout).data
    except DaemonNotRunning as exc:
        fail(str(exc), ClientExit.DAEMON_NOT_RUNNING, as_json)
    except RequestFailed as exc:
        code = {
            ErrorCode.NOT_FOUND: ClientExit.NOT_FOUND,
            ErrorCode.INVALID_ARGUMENT: ClientExit.CONFIG_ERROR,
        }.get(exc.code, ClientExit.REFUSED)
        fail(str(exc), code, as_json)
    except RuntimeError as exc:
        fail(str(exc), ClientExit.REFUSED, as_json)


# -- the daemon ------------------------------------------------------------------------------


@main.group()
def daemon() -> None:
    """The supervisor that runs jobs."""


@daemon.command("run")
@click.pass_context
def daemon_run(ctx) -> None:
    """Run the supervisor in the foreground (as launchd does)."""
    from loractl.supervisor.service import main as supervisor_main

    sys.exit(supervisor_main(ctx.obj.home))


@daemon.command("stop")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def daemon_stop(ctx, as_json) -> None:
    """Ask the supervisor to checkpoint the running job and exit."""
    from loractl.protocol import ShutdownRequest

    emit(call(ctx, ShutdownRequest(), as_json), as_json)


@daemon.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def daemon_status(ctx, as_json) -> None:
    """Whether the supervisor is running, and what it is doing."""
    from loractl.protocol import StatusRequest

    emit(call(ctx, StatusRequest(), as_json), as_json)


# -- jobs ------------------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx, as_json) -> None:
    """The supervisor, the running job and the queue, at a glance."""
    from loractl.protocol import StatusRequest

    emit(call(ctx, StatusRequest(), as_json), as_json)


@main.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_jobs(ctx, as_json) -> None:
    """Every job, highest priority first."""
    from loractl.client.render import job_table
    from loractl.protocol import ListRequest

    data = call(ctx, ListRequest(), as_json)
    if as_json:
        emit(data, as_json)
    else:
        click.echo(job_table(data["jobs"]))


@main.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--priority", type=int, default=None, help="Queue priority (higher runs first).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def submit(ctx, configs, priority, as_json) -> None:
    """Validate CONFIG files here, then queue them; prints each job's id."""
    from loractl.config import ConfigError, load_config
    from loractl.protocol import SubmitRequest

    for path in configs:
        try:
            load_config(path)
        except ConfigError as exc:
            fail(str(exc), ClientExit.CONFIG_ERROR, as_json)
    submitted = [
        call(ctx, SubmitRequest(config_path=str(path.resolve()), priority=priority), as_json)
        for path in configs
    ]
    if as_json:
        emit(submitted[0] if len(submitted) == 1 else {"jobs": submitted}, as_json)
    else:
        for job in submitted:
            click.echo(f"queued {job['id']} ({job['name']})")


@main.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show(ctx, job, as_json) -> None:
    """Everything about JOB: state, rung, crashes, peak memory per rung, outputs, history."""
    from loractl.client.render import job_details
    from loractl.protocol import ShowRequest

    data = call(ctx, ShowRequest(job=job), as_json)["job"]
    if as_json:
        emit(data, as_json)
    else:
        click.echo(job_details(data))


@main.command()
@click.argument("job")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def wait(ctx, job, timeout, as_json) -> None:
    """Block until JOB finishes; exit 0 only if it completed."""
    import time

    from loractl.protocol import ShowRequest

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        data = call(ctx, ShowRequest(job=job), as_json)["job"]
        if data["state"] in ("completed", "failed", "cancelled"):
            break
        if deadline is not None and time.monotonic() > deadline:
            fail(f"job {data['id']} is still {data['state']}", ClientExit.TIMEOUT, as_json)
        time.sleep(0.25)
    result = {
        "id": data["id"],
        "state": data["state"],
        "outcome": data["outcome"],
        "reason": data["reason"],
        "adapter_path": data["adapter_path"],
    }
    emit(result, as_json)
    sys.exit(ClientExit.OK if data["state"] == "completed" else ClientExit.JOB_FAILED)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
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
def train(config, fresh, assignments, telemetry, job_id, attempt, rung, as_json, **flags) -> None:
    """Train CONFIG in the foreground, resuming from its newest valid checkpoint.

    SIGTERM or Ctrl-C finishes the current step, writes a checkpoint and exits; running the
    same command again continues exactly where it stopped.
    """
    from loractl.daemon.trainer import run

    code = run(
        config,
        fresh=fresh,
        overrides={**overrides_from_flags(flags), **parse_assignments(assignments)},
        telemetry_endpoint=telemetry,
        job_id=job_id,
        attempt=attempt,
        rung=rung,
        show_progress=None if not as_json else False,
    )
    if as_json:
        emit({"exit_code": int(code), "outcome": ExitCode(code).name.lower()}, as_json=True)
    sys.exit(int(code))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--prepare", is_flag=True, help="Only build the tiny model, data and job.yaml.")
@click.option(
    "--preset",
    type=click.Choice(["tiny", "ladder"]),
    default=None,
    help="tiny: smallest real model (default for --prepare); ladder: memory visibly driven "
    "by sequence length (default for the demo run).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the written paths as JSON.")
def demo(directory, prepare, preset, seed, as_json) -> None:
    """Build a tiny model and job in DIRECTORY and, unless --prepare, run the demo."""
    if prepare:
        from loractl.daemon.tinymodel import prepare as build

        paths = build(directory, preset=preset or "tiny", seed=seed)
        emit({k: str(v) for k, v in paths.items()}, as_json=as_json)
        return
    from loractl.daemon.demo import run_demo

    sys.exit(run_demo(directory, preset=preset, seed=seed, as_json=as_json))


@main.group()
def config() -> None:
    """Job configs."""


@config.command("validate")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the effective config as JSON.")
def config_validate(file, as_json) -> None:
    """Check FILE against the job schema and print the effective config."""
    from loractl.config import ConfigError, load_config

    try:
        cfg = load_config(file)
    except ConfigError as exc:
        fail(str(exc), ExitCode.CONFIG_ERROR, as_json=as_json)
        return
    emit({"ok": True, "config": cfg.to_dict(), "ladder": cfg.effective_ladder()}, as_json)


@main.command()
@click.option("--json", "as_json", is_flag=True)
def version(as_json) -> None:
    """Print loractl's version and protocol version."""
    emit({"version": __version__, "protocol": PROTOCOL_VERSION}, as_json=as_json)


if __name__ == "__main__":
    main()
