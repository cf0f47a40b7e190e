"""`loractl daemon install|uninstall|start|restart`: the supervisor as a launchd or systemd service.

Each click command is a thin layer over a plain function that returns a JSON-able dict, so the
same functions serve scripts, tests and `loractl daemon status`. ``register`` adds the commands
to the CLI's ``daemon`` group. Nothing here imports mlx.
"""

from __future__ import annotations

from typing import Any

import click

from loractl.client.render import emit, fail
from loractl.launchd import (
    DEFAULT_LABEL,
    TARGETS,
    CommandRunner,
    InvalidLabel,
    ServiceError,
    build_definition,
    service_manager,
    service_state,
)
from loractl.paths import Layout
from loractl.protocol import ClientExit

# Tests put a fake CommandRunner here (ctx.meta is shared by every context of one invocation).
RUNNER_KEY = "loractl.service_runner"


def install_service(
    layout: Layout,
    target: str | None = None,
    label: str = DEFAULT_LABEL,
    dry_run: bool = False,
    runner: CommandRunner | None = None,
) -> dict[str, Any]:
    """Write the service file for ``layout``'s home and load it; ``dry_run`` only renders it."""
    definition = build_definition(layout, target=target, label=label)
    if dry_run:
        return {
            "target": definition.target,
            "label": definition.label,
            "unit_path": str(definition.path),
            "dry_run": True,
            "content": definition.render().decode(),
        }
    manager = service_manager(definition.target, definition.label, runner)
    return manager.install(definition).as_dict()


def uninstall_service(
    layout: Layout,
    target: str | None = None,
    label: str = DEFAULT_LABEL,
    runner: CommandRunner | None = None,
) -> dict[str, Any]:
    """Stop the service and remove its file; a service that was never loaded is fine."""
    return service_manager(target, label, runner).uninstall().as_dict()


def start_service(
    layout: Layout,
    target: str | None = None,
    label: str = DEFAULT_LABEL,
    restart: bool = False,
    runner: CommandRunner | None = None,
) -> dict[str, Any]:
    """Start the installed service now; ``restart`` stops the running supervisor first."""
    return service_manager(target, label, runner).start(restart=restart).as_dict()


def service_status(
    layout: Layout,
    target: str | None = None,
    label: str | None = None,
    runner: CommandRunner | None = None,
) -> dict[str, Any]:
    """The service manager's view of the supervisor (installed, loaded, running, pid, ...)."""
    return service_state(layout, target=target, label=label, runner=runner).as_dict()


def _run(ctx: click.Context, as_json: bool, operation, **options) -> dict[str, Any]:
    """Call ``operation`` with the CLI's layout and runner; every failure becomes one line."""
    try:
        return operation(ctx.obj, runner=ctx.meta.get(RUNNER_KEY), **options)
    except InvalidLabel as exc:
        fail(str(exc), ClientExit.USAGE, as_json)
    except ServiceError as exc:
        fail(str(exc), ClientExit.REFUSED, as_json)
    except OSError as exc:
        fail(f"cannot write the service file: {exc}", ClientExit.REFUSED, as_json)
    raise AssertionError("unreachable: fail() exits")


def _show(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit(result, as_json)
        return
    click.echo(f"{result['action']}: {result['label']} ({result['target']})")
    for step in result["steps"]:
        click.echo(f"  {step}")
    for hint in result["hints"]:
        click.echo(f"  note: {hint}")


target_option = click.option(
    "--target",
    type=click.Choice(TARGETS),
    default=None,
    help="Service manager (default: launchd on macOS, systemd elsewhere).",
)
label_option = click.option(
    "--label",
    default=DEFAULT_LABEL,
    show_default=True,
    help="Reverse-DNS service label (launchd); another label also names another systemd unit.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@click.command("install")
@click.option("--dry-run", is_flag=True, help="Print the exact file it would write; touch nothing.")
@target_option
@label_option
@json_option
@click.pass_context
def install(ctx, dry_run, target, label, as_json) -> None:
    """Keep the supervisor running: a LaunchAgent (macOS) or a systemd --user unit."""
    result = _run(ctx, as_json, install_service, target=target, label=label, dry_run=dry_run)
    if dry_run and not as_json:
        # stdout is exactly the file, so `... --dry-run > file` reproduces it.
        click.echo(f"would write {result['unit_path']}", err=True)
        click.echo(result["content"], nl=False)
        return
    _show(result, as_json)


@click.command("uninstall")
@target_option
@label_option
@json_option
@click.pass_context
def uninstall(ctx, target, label, as_json) -> None:
    """Stop the supervisor service and remove its plist or unit."""
    _show(_run(ctx, as_json, uninstall_service, target=target, label=label), as_json)


@click.command("start")
@target_option
@label_option
@json_option
@click.pass_context
def start(ctx, target, label, as_json) -> None:
    """Start the installed supervisor service now."""
    _show(_run(ctx, as_json, start_service, target=target, label=label), as_json)


@click.command("restart")
@target_option
@label_option
@json_option
@click.pass_context
def restart(ctx, target, label, as_json) -> None:
    """Restart the supervisor service (it checkpoints the running job first)."""
    _show(_run(ctx, as_json, start_service, target=target, label=label, restart=True), as_json)


def register(group: click.Group) -> None:
    """Add install, uninstall, start, restart and repair to the CLI's ``daemon`` group."""
    for command in (install, uninstall, start, restart, repair):
        group.add_command(command)


def repair_store(layout: Layout, runner: CommandRunner | None = None) -> dict[str, Any]:
    """`loractl daemon repair`: what the supervisor does at start when its job database is
    damaged, by hand. A damaged database is moved aside and rebuilt from the job folders
    (and the backup); a sound one only gets back the job folders it lost. Refused while a
    supervisor runs: it holds the database open and would write over the rebuild."""
    import fcntl
    import os

    from loractl.supervisor import storecare

    if not layout.home.is_dir():
        raise ServiceError(f"nothing to repair: there is no loractl home at {layout.home}")
    created = not layout.pidfile.exists()
    fd = os.open(layout.pidfile, os.O_RDWR | os.O_CREAT, 0o600)
    previous = os.umask(0o077)  # the rebuilt database is the user's alone, as the daemon's
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = layout.pidfile.read_text(errors="replace").strip() or "?"
            raise ServiceError(
                f"the supervisor (pid {pid}) is running; it repairs the database itself as it "
                "starts: run `loractl daemon restart`, or `loractl daemon stop` and then "
                "`loractl daemon repair`"
            ) from None
        try:
            problem = storecare.check(layout.database, full=True)
        except Exception as exc:  # not damage: a permission, say; nothing is moved
            raise ServiceError(f"cannot check {layout.database}: {exc}") from None
        if problem is None:
            from loractl.supervisor.store import Store

            with Store(layout.database) as store:
                found = storecare.restore_lost_jobs(store, layout, read_the_backup=True)
            moved, backup_used = None, False
        else:
            try:
                done = storecare.rebuild(layout, problem)
            except storecare.StoreUnrecoverable as exc:
                raise ServiceError(str(exc)) from None
            found, moved, backup_used = done.recovered, done.moved_to, done.backup_used
    finally:
        os.umask(previous)
        if created:
            layout.pidfile.unlink(missing_ok=True)
        os.close(fd)
    return {
        "database": str(layout.database),
        "damaged": problem,
        "moved_to": str(moved) if moved else None,
        "backup_used": backup_used,
        "recovered": [
            {"id": job.job_id, "name": job.name, "state": str(job.state), "how": job.how}
            for job in found
        ],
    }


@click.command("repair")
@json_option
@click.pass_context
def repair(ctx, as_json) -> None:
    """Check the job database; if damaged, move it aside and rebuild it from the job
    folders (the supervisor must be stopped). Jobs come back completed, or paused to resume."""
    result = _run(ctx, as_json, repair_store)
    if as_json:
        emit(result, as_json)
        return
    if result["damaged"]:
        click.echo(f"{result['database']} was damaged: {result['damaged']}")
        click.echo(f"  moved aside to {result['moved_to']}")
        source = "the backup and the job folders" if result["backup_used"] else "the job folders"
        click.echo(f"  rebuilt from {source}")
    else:
        click.echo(f"{result['database']} is sound")
    for job in result["recovered"]:
        click.echo(f"  {job['id']} {job['name']}: {job['state']} ({job['how']})")
    if not result["recovered"]:
        click.echo("  no job was missing" if not result["damaged"] else "  no job folders")
    if any(job["state"] == "paused" for job in result["recovered"]):
        click.echo("resume the paused jobs with `loractl resume JOB` once the supervisor runs")
