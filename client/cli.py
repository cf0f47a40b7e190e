"""The ``loractl`` command line: a thin click layer.

Each command parses its options, calls one plain function and hands the result to a renderer
(``render.py``). Nothing here imports mlx at module level: ``loractl status`` has to answer in
well under 150 ms, so the trainer's heavy imports happen only inside the commands that train.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from loractl import __version__
from loractl.client.render import emit, fail
from loractl.paths import Layout
from loractl.protocol import (
    PRIORITY_MAX,
    PRIORITY_MIN,
    PROTOCOL_VERSION,
    ClientExit,
    ErrorCode,
)
from loractl.terminal import printable

# The most lines `logs -n` prints; a larger count is a mistake, not a wish.
MAX_LOG_LINES = 1_000_000


class LazyGroup(click.Group):
    """Commands with costly imports are loaded only when they are run."""

    lazy = {"train": "loractl.client.train_cmd:train", "doctor": "loractl.client.doctor:doctor"}

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if lazy is not None:
            self.lazy = lazy

    def invoke(self, ctx):
        # A file or folder we may not touch is the user's to fix: one line, not a traceback.
        try:
            return super().invoke(ctx)
        except PermissionError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            fail(
                f"permission denied:{where} ({exc.strerror or exc}); check its owner and mode",
                ClientExit.REFUSED,
                as_json=False,
            )

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx, name):
        if name in self.lazy:
            import importlib

            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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


def call(ctx, message, as_json: bool, timeout: float = 5.0, offline: bool = False):
    """Send a request; turn every failure into one line and a named exit code.

    With ``offline``, a read (list, show, history, ladder) is answered from the job database
    when no supervisor is running; the data then carries ``"offline": True``.
    """
    from loractl.client.control import DaemonNotRunning, RequestFailed, request

    try:
        return request(ctx.obj, message, timeout=timeout).data
    except DaemonNotRunning as exc:
        if offline and not exc.running:
            data = read_offline(ctx.obj, message, str(exc), as_json)
            if data is not None:
                return data
        fail(str(exc), ClientExit.DAEMON_NOT_RUNNING, as_json)
    except RequestFailed as exc:
        code = {
            ErrorCode.NOT_FOUND: ClientExit.NOT_FOUND,
            ErrorCode.INVALID_ARGUMENT: ClientExit.CONFIG_ERROR,
        }.get(exc.code, ClientExit.REFUSED)
        fail(str(exc), code, as_json)
    except RuntimeError as exc:
        fail(str(exc), ClientExit.REFUSED, as_json)


def read_offline(layout: Layout, message, not_running: str, as_json: bool):
    """``message`` answered from the database, or None when the home has none."""
    from loractl.client.offline import MARK, Unreadable, answer
    from loractl.supervisor.store import JobNotFound

    try:
        return answer(layout, message)
    except FileNotFoundError:
        return None
    except JobNotFound as exc:
        fail(f"{exc} {MARK}", ClientExit.NOT_FOUND, as_json)
    except Unreadable as exc:
        fail(f"{not_running}; {exc}", ClientExit.DAEMON_NOT_RUNNING, as_json)


def mark_offline(data: dict, as_json: bool) -> None:
    """Say, above text output, that it was read from the database with no supervisor."""
    if data.get("offline") and not as_json:
        from loractl.client.offline import MARK

        click.echo(MARK)


# -- the daemon ------------------------------------------------------------------------------


# The service verbs load launchctl/systemctl code that `status` and `run` never need.
_SERVICE_VERBS = {
    name: f"loractl.client.service_cmd:{name}"
    for name in ("install", "uninstall", "start", "restart", "repair")
}


@main.group(cls=LazyGroup, lazy=_SERVICE_VERBS)
def daemon() -> None:
    """The supervisor that runs jobs, and the service (launchd, systemd) that keeps it up."""


@daemon.command("run")
@click.pass_context
def daemon_run(ctx) -> None:
    """Run the supervisor in the foreground (as launchd does)."""
    from loractl.supervisor.service import main as supervisor_main

    sys.exit(supervisor_main(ctx.obj.home))


@daemon.command("stop")
@click.option(
    "--timeout",
    type=float,
    default=180.0,
    show_default=True,
    help="How long to wait for the running job's final checkpoint.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def daemon_stop(ctx, timeout, as_json) -> None:
    """Checkpoint the running job, then stop the supervisor (it exits 0, so launchd and
    systemd leave it stopped until the next login or `loractl daemon start`)."""
    from loractl.protocol import ShutdownRequest

    data = call(ctx, ShutdownRequest(), as_json)
    stopped = wait_until_stopped(ctx.obj, timeout)
    result = {**data, "stopped": stopped}
    if as_json:
        emit(result, as_json)
    else:
        job = data.get("checkpointing")
        first = (
            f"checkpointed job {job}, which resumes when the supervisor starts again; "
            if job
            else ""
        )
        if stopped:
            click.echo(f"{first}supervisor (pid {data['pid']}) stopped".capitalize())
        else:
            click.echo(
                f"asked supervisor (pid {data['pid']}) to stop; still running after {timeout:.0f} s"
            )
    sys.exit(ClientExit.OK if stopped else ClientExit.TIMEOUT)


def wait_until_stopped(layout: Layout, timeout: float) -> bool:
    """Whether the supervisor let go of its pidfile lock (it exited) within ``timeout``."""
    import time

    from loractl.client.control import supervisor_alive

    deadline = time.monotonic() + timeout
    while supervisor_alive(layout):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@daemon.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def daemon_status(ctx, as_json) -> None:
    """The service manager's view (installed, loaded, pid, last exit) and the supervisor's."""
    from loractl.client.control import DaemonNotRunning, request
    from loractl.client.render import service_text
    from loractl.client.service_cmd import service_status
    from loractl.protocol import StatusRequest

    service = service_status(ctx.obj)
    try:
        supervisor = request(ctx.obj, StatusRequest(), timeout=2.0).data
    except DaemonNotRunning:
        supervisor = None
    if as_json:
        emit({"service": service, "supervisor": supervisor}, as_json)
    else:
        click.echo(service_text(service, supervisor))
    sys.exit(ClientExit.OK if supervisor else ClientExit.DAEMON_NOT_RUNNING)


@daemon.command("keys")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def daemon_keys(ctx, as_json) -> None:
    """This install's CURVE keys for jobs with ranks on other Macs (made on first use): the
    folder, and the two files each other Mac needs at the same path."""
    from loractl.keys import TRAINER_FILES, MissingKeys, UnsafeKeys, ensure_keys, keys_folder

    try:
        keys = ensure_keys(keys_folder(ctx.obj.home))
    except (MissingKeys, UnsafeKeys) as exc:
        fail(str(exc), ClientExit.CONFIG_ERROR, as_json)
    data = {
        "folder": str(keys.folder),
        "copy_to_each_mac": [str(keys.folder / name) for name in TRAINER_FILES],
        "server_public_key": keys.server_public.decode(),
    }
    if as_json:
        emit(data, as_json)
    else:
        click.echo(f"keys: {printable(data['folder'])}")
        click.echo("copy to the same path on every other Mac of a distributed job (mode 0600):")
        for path in data["copy_to_each_mac"]:
            click.echo(f"  {printable(path)}")


# -- jobs ------------------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx, as_json) -> None:
    """The supervisor, the queue, the inbox and its recent rejections, at a glance."""
    from loractl.client.render import status_text
    from loractl.protocol import StatusRequest

    data = call(ctx, StatusRequest(), as_json)
    emit(data, as_json) if as_json else click.echo(status_text(data))


@main.command("list")
@click.option(
    "--rejected", is_flag=True, help="Also list the inbox files that were rejected, and why."
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_jobs(ctx, rejected, as_json) -> None:
    """Every job, highest priority first (read from the database while the supervisor is
    not running)."""
    from loractl.client.render import job_table, rejection_lines
    from loractl.protocol import ListRequest

    data = call(ctx, ListRequest(rejected=rejected), as_json, offline=True)
    if as_json:
        emit(data, as_json)
        return
    mark_offline(data, as_json)
    click.echo(job_table(data["jobs"]))
    if rejected:
        click.echo("\nrejected from the inbox:")
        click.echo("\n".join(rejection_lines(data["rejected"], "  ")) or "  none")


@main.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--priority", type=int, default=None, help="Queue priority (higher runs first).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def submit(ctx, configs, priority, as_json) -> None:
    """Validate CONFIG files here, then queue them; prints each job's id."""
    from loractl.config import ConfigError, load_config
    from loractl.protocol import SubmitRequest

    within("--priority", priority, PRIORITY_MIN, PRIORITY_MAX, as_json)
    notes = []
    for path in configs:
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            fail(str(exc), exc.exit_code, as_json)
        warn(cfg.warnings)
        notes.append(resume_note(cfg))
    submitted = [
        call(ctx, SubmitRequest(config_path=str(path.resolve()), priority=priority), as_json)
        for path in configs
    ]
    for job, note in zip(submitted, notes, strict=True):
        warn(job.get("warnings") or [])
        if note:
            # Its adapter_path already holds a checkpoint: the job continues it.
            job["resumes"] = note
            click.echo(f"loractl: job {printable(job['id'])} {note}", err=True)
    if as_json:
        emit(submitted[0] if len(submitted) == 1 else {"jobs": submitted}, as_json)
    else:
        for job in submitted:
            click.echo(f"queued {printable(job['id'])} ({printable(job['name'])})")


@main.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show(ctx, job, as_json) -> None:
    """Everything about JOB: state, rung, crashes, peak memory per rung, outputs, history
    (read from the database while the supervisor is not running)."""
    from loractl.client.render import job_details
    from loractl.client.report import loss_sparkline
    from loractl.protocol import ShowRequest

    reply = call(ctx, ShowRequest(job=job), as_json, offline=True)
    job_note(reply)
    data = reply["job"]
    if as_json:
        emit(data, as_json)
    else:
        mark_offline(data, as_json)
        click.echo(job_details(data, loss_line=loss_sparkline(data.get("adapter_path"))))


def one_or_all(job: str | None, every: bool, as_json: bool) -> None:
    """Refuse a JOB together with --all, or neither, in one line with exit 2."""
    if every and job:
        fail(
            f"name a JOB or pass --all, not both (got {job!r} and --all)", ClientExit.USAGE, as_json
        )
    if not every and not job:
        fail("name a JOB, or pass --all for every job", ClientExit.USAGE, as_json)


def within(option: str, value: int | None, low: int, high: int, as_json: bool) -> None:
    """Refuse a number outside [low, high] in one line with exit 2 (usage): never a
    traceback, and never a request the supervisor would have to refuse."""
    if value is not None and not low <= value <= high:
        fail(f"{option} must be between {low} and {high} (got {value})", ClientExit.USAGE, as_json)


def poll_until(fetch, timeout: float | None, interval: float = 0.25):
    """Call ``fetch`` until it returns something other than None; None once ``timeout``
    seconds have passed (the last fetch still counts)."""
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        result = fetch()
        if result is not None:
            return result
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(interval)


@main.command()
@click.argument("job", required=False)
@click.option(
    "--all", "every", is_flag=True, help="Wait until the queue drains: no job left pending."
)
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def wait(ctx, job, every, timeout, as_json) -> None:
    """Block until JOB finishes; exit 0 only if it completed, 1 if it failed or was
    cancelled, 124 on --timeout.

    With --all, until no job is queued, starting, running, pausing, cancelling or in
    backoff (jobs submitted meanwhile included); exit 0 only if every one of them completed.
    A queue held by `pause --all` never drains: its queued jobs wait for `resume --all`."""
    one_or_all(job, every, as_json)
    if every:
        wait_all(ctx, timeout, as_json)
    from loractl.protocol import TERMINAL, ShowRequest

    last: dict = {}

    def ended():
        last["job"] = call(ctx, ShowRequest(job=job), as_json)["job"]
        return last["job"] if last["job"]["state"] in TERMINAL else None

    data = poll_until(ended, timeout)
    if data is None:
        data = last["job"]
        fail(f"job {data['id']} is still {data['state']}", ClientExit.TIMEOUT, as_json)
    result = {
        "id": data["id"],
        "state": data["state"],
        "outcome": data["outcome"],
        "reason": data["reason"],
        "adapter_path": data["adapter_path"],
    }
    emit(result, as_json)
    sys.exit(ClientExit.OK if data["state"] == "completed" else ClientExit.JOB_FAILED)


def wait_all(ctx, timeout: float | None, as_json: bool) -> None:
    """`wait --all`: poll the list until no job is pending, then report every job that was."""
    from loractl.client.render import drained_text
    from loractl.protocol import PENDING, ListRequest, ShowRequest

    seen: dict[str, dict] = {}  # every job seen pending, as last listed
    pending: list[dict] = []

    def drained():
        jobs = call(ctx, ListRequest(), as_json)["jobs"]
        pending[:] = [j for j in jobs if j["state"] in PENDING]
        for j in jobs:
            if j["state"] in PENDING or j["id"] in seen:
                seen[j["id"]] = j
        return True if not pending else None

    if poll_until(drained, timeout) is None:
        listed = ", ".join(f"{j['id']} ({j['state']})" for j in pending)
        fail(f"{len(pending)} jobs still pending: {listed}", ClientExit.TIMEOUT, as_json)
    jobs = []
    for j in seen.values():
        entry = {k: j[k] for k in ("id", "name", "state", "outcome")}
        if j["state"] != "completed":
            # Why it did not complete; a job removed meanwhile keeps its last listing.
            from loractl.client.control import RequestFailed, request

            try:
                shown = request(ctx.obj, ShowRequest(job=j["id"])).data["job"]
                entry.update(state=shown["state"], outcome=shown["outcome"])
                entry["reason"] = shown["reason"]
            except (RequestFailed, RuntimeError):
                pass
        jobs.append(entry)
    completed = all(j["state"] == "completed" for j in jobs)
    result = {"jobs": jobs, "completed": completed}
    emit(result, as_json) if as_json else click.echo(drained_text(jobs))
    sys.exit(ClientExit.OK if completed else ClientExit.JOB_FAILED)


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
    from loractl.client.demo import PrepareFailed, prepare_workspace, run_demo

    if prepare:
        try:
            paths = prepare_workspace(directory, preset=preset or "tiny", seed=seed)
        except PrepareFailed as exc:
            fail(str(exc), exc.code, as_json)
        emit({k: str(v) for k, v in paths.items()}, as_json=as_json)
        return

    sys.exit(run_demo(directory, preset=preset, seed=seed, as_json=as_json))


def _job_action(name: str, request_type: str, doc: str):
    """Build a `loractl NAME JOB` command that sends one job request and prints the reply."""

    @main.command(name, help=doc)
    @click.argument("job")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def command(ctx, job, as_json) -> None:
        from loractl import protocol

        message = getattr(protocol, request_type)(job=job)
        data = call(ctx, message, as_json)
        job_note(data)
        if as_json:
            emit(data, as_json)
        else:
            click.echo(f"{printable(data['id'])}: {printable(data.get('state', 'ok'))}")

    return command


_job_action("cancel", "CancelRequest", "Cancel JOB; a running trainer is stopped first.")


@main.command()
@click.argument("job", required=False)
@click.option(
    "--all",
    "every",
    is_flag=True,
    help="Hold the whole queue: the running job checkpoints and pauses, nothing new starts.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def pause(ctx, job, every, as_json) -> None:
    """Pause JOB: checkpoint and stop its trainer; `resume` continues it. With --all, hold
    the queue until `resume --all`."""
    from loractl.client.render import queue_text
    from loractl.protocol import PauseRequest

    one_or_all(job, every, as_json)
    data = call(ctx, PauseRequest(job=job or "", all=every), as_json)
    job_note(data)
    if as_json:
        emit(data, as_json)
    elif every:
        click.echo(queue_text(data, held=True))
    else:
        click.echo(f"{printable(data['id'])}: {printable(data.get('state', 'ok'))}")


@main.command()
@click.argument("job", required=False)
@click.option(
    "--all",
    "every",
    is_flag=True,
    help="Release the queue held by `pause --all` and resume the jobs it paused.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def resume(ctx, job, every, as_json) -> None:
    """Queue a paused JOB again; it continues from its checkpoint. With --all, release the
    queue and resume what `pause --all` paused."""
    from loractl.client.render import queue_text
    from loractl.protocol import ResumeRequest

    one_or_all(job, every, as_json)
    data = call(ctx, ResumeRequest(job=job or "", all=every), as_json)
    job_note(data)
    if as_json:
        emit(data, as_json)
    elif every:
        click.echo(queue_text(data, held=False))
    else:
        click.echo(f"{printable(data['id'])}: {printable(data.get('state', 'ok'))}")


@main.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def remove(ctx, job, as_json) -> None:
    """Forget one finished JOB (completed, failed or cancelled): its row and history. Its
    adapters stay where they are; `clean` forgets every finished job at once."""
    from loractl.protocol import RemoveRequest

    data = call(ctx, RemoveRequest(job=job), as_json)
    job_note(data)
    if as_json:
        emit(data, as_json)
    elif data.get("adapter_path"):
        click.echo(
            f"removed {printable(data['id'])}; adapters kept in {printable(data['adapter_path'])}"
        )
    else:
        click.echo(f"removed {printable(data['id'])}; it wrote no adapters")


@main.command()
@click.argument("job")
@click.option("--from-rung", type=int, default=None, help="Restart on this ladder rung.")
@click.option(
    "--fresh",
    is_flag=True,
    help="Discard the checkpoints and train from the start (e.g. after changing the data).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def retry(ctx, job, from_rung, fresh, as_json) -> None:
    """Queue a failed or cancelled JOB again, from its checkpoint (or --fresh, from the
    start), optionally on another rung."""
    from loractl.protocol import RetryRequest

    data = call(ctx, RetryRequest(job=job, from_rung=from_rung, fresh=fresh), as_json)
    job_note(data)
    if as_json:
        emit(data, as_json)
    else:
        start = printable(data.get("start") or "from its checkpoint")
        click.echo(f"{printable(data['id'])}: queued on rung {printable(data['rung'])}, {start}")


@main.command()
@click.argument("job")
@click.argument("value", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def priority(ctx, job, value, as_json) -> None:
    """Set JOB's queue priority (higher runs first), a 32-bit signed number."""
    from loractl.protocol import PriorityRequest

    within("priority", value, PRIORITY_MIN, PRIORITY_MAX, as_json)
    data = call(ctx, PriorityRequest(job=job, priority=value), as_json)
    job_note(data)
    if as_json:
        emit(data, as_json)
    else:
        click.echo(f"{printable(data['id'])}: priority {printable(data['priority'])}")


@main.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def history(ctx, job, as_json) -> None:
    """JOB's events: transitions, crashes and their causes, ladder steps (read from the
    database while the supervisor is not running)."""
    from loractl.client.render import history_table
    from loractl.protocol import HistoryRequest

    data = call(ctx, HistoryRequest(job=job), as_json, offline=True)
    job_note(data)
    mark_offline(data, as_json)
    emit(data, as_json) if as_json else click.echo(history_table(data["events"]))


@main.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ladder(ctx, job, as_json) -> None:
    """JOB's fallback rungs, with the peak memory measured on each (read from the database
    while the supervisor is not running)."""
    from loractl.client.render import ladder_table
    from loractl.protocol import LadderRequest

    data = call(ctx, LadderRequest(job=job), as_json, offline=True)
    job_note(data)
    mark_offline(data, as_json)
    emit(data, as_json) if as_json else click.echo(ladder_table(data["ladder"], data["rung"]))


@main.command()
@click.argument("job")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The HTML file to write (default: report-<name>.html in this folder).",
)
@click.option("--open", "open_page", is_flag=True, help="Then open it in the browser.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def report(ctx, job, output, open_page, as_json) -> None:
    """One self-contained HTML page about JOB: losses with its crashes, memory stops, ladder
    steps, pauses and restarts marked, tokens/s, memory per rung, attempts, settings and
    adapters (read from the database while the supervisor is not running)."""
    from loractl.client.report import write_report
    from loractl.protocol import ShowRequest

    reply = call(ctx, ShowRequest(job=job), as_json, offline=True)
    job_note(reply)
    try:
        written = write_report(reply["job"], output)
    except OSError as exc:
        fail(f"cannot write the report: {exc}", ClientExit.REFUSED, as_json)
        return
    if open_page:
        click.launch(written["path"])
    if as_json:
        emit(written, as_json)
    else:
        click.echo(f"wrote {printable(written['path'])}")


@main.command()
@click.option("--adapters", is_flag=True, help="Also delete the finished jobs' adapters.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def clean(ctx, adapters, as_json) -> None:
    """Forget finished jobs (completed, failed, cancelled); keeps adapters unless asked."""
    from loractl.protocol import CleanRequest

    data = call(ctx, CleanRequest(adapters=adapters), as_json)
    emit(data, as_json) if as_json else click.echo(f"removed {len(data['removed'])} jobs")


@main.command()
@click.argument("job", required=False)
@click.option("--daemon", "of_daemon", is_flag=True, help="The supervisor's own log instead.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option(
    "--lines",
    "-n",
    type=int,
    default=20,
    show_default=True,
    help=f"How many of the last lines to print (0 to {MAX_LOG_LINES:,}).",
)
@click.option("--json", "as_json", is_flag=True, help="Raw JSON log records.")
@click.pass_context
def logs(ctx, job, of_daemon, follow, lines, as_json) -> None:
    """JOB's training log (one record per step, checkpoint and evaluation), or with --daemon
    the supervisor's (spawns, exits and their causes, ladder steps; it rotates at 5 MB).
    Works while the supervisor is not running too."""
    from loractl.client.logs import follow_log, tail_log
    from loractl.protocol import ShowRequest

    if of_daemon == bool(job):
        fail("name a JOB, or pass --daemon for the supervisor's log", ClientExit.USAGE, as_json)
    within("-n/--lines", lines, 0, MAX_LOG_LINES, as_json)
    if of_daemon:
        from loractl.supervisor.logfile import LOG_NAME

        log_path = ctx.obj.logs / LOG_NAME
    else:
        reply = call(ctx, ShowRequest(job=job), as_json, offline=True)
        job_note(reply)
        data = reply["job"]
        if data.get("offline"):
            from loractl.client.offline import MARK

            # --json prints the log's own records, one per line: the note goes to stderr.
            click.echo(MARK, err=as_json)
        if not data.get("adapter_path"):
            fail(
                f"job {data['id']} has no adapter folder: "
                f"{(data.get('effective_config') or {}).get('error', 'its config does not load')}",
                ClientExit.NOT_FOUND,
                as_json,
            )
        log_path = Path(data["adapter_path"]) / "train.log"
    # A log holds whatever the trainer and its libraries wrote: its lines (and a record's
    # multi-line values) keep their structure, every other control character is escaped.
    for line in tail_log(log_path, lines, as_json):
        click.echo(printable(line, multiline=True))
    if follow:
        try:
            for line in follow_log(log_path, as_json):
                click.echo(printable(line, multiline=True))
        except KeyboardInterrupt:
            pass


@main.command()
@click.argument("job", required=False)
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Follow whatever runs, job after job, waiting for the next one while idle.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object per event instead of the live view."
)
@click.pass_context
def watch(ctx, job, follow, as_json) -> None:
    """A live view of JOB (or of the job running now): progress, loss, tok/s, memory, rung,
    ETA. With nothing running (and nothing queued to start) it says so and exits 0; with
    --follow it waits for the next job instead and stays with whatever runs.

    Without a terminal (piped, in a log) it prints one plain line per event instead, and
    exits when the job ends (0 completed, 1 failed or cancelled); with --follow, never."""
    from loractl.client.watch import run_watch, run_watch_lines

    if job and follow:
        fail("--follow follows whatever runs; it takes no JOB", ClientExit.USAGE, as_json)
    if as_json or not sys.stdout.isatty():
        sys.exit(run_watch_lines(ctx.obj, job, as_json=as_json, follow=follow))
    sys.exit(run_watch(ctx.obj, job, follow=follow))


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell) -> None:
    """Print the shell completion script: eval "$(loractl completion zsh)"."""
    import os
    import subprocess

    env = {**os.environ, "_LORACTL_COMPLETE": f"{shell}_source"}
    result = subprocess.run([sys.argv[0]], env=env, capture_output=True, text=True)
    click.echo(result.stdout, nl=False)


@main.group()
def config() -> None:
    """Job configs."""


@config.command("validate")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the effective config as JSON.")
def config_validate(file, as_json) -> None:
    """Check FILE against the job schema and summarize what it will do, with its ladder."""
    from loractl.client.render import config_summary
    from loractl.config import ConfigError, load_config

    try:
        cfg = load_config(file)
    except ConfigError as exc:
        fail(str(exc), exc.exit_code, as_json=as_json)
        return
    if as_json:
        emit(
            {
                "ok": True,
                "config": cfg.to_dict(),
                "ladder": cfg.effective_ladder(),
                "warnings": list(cfg.warnings),
            },
            as_json,
        )
        return
    from loractl.supervisor.jobview import budget_mb
    from loractl.supervisor.ladder import describe_rung, rung_count

    warn(cfg.warnings)
    budget = (
        f"memory_budget_mb {cfg.memory_budget_mb}"
        if cfg.memory_budget_mb
        else f"no memory_budget_mb: 70% of this machine's, {budget_mb(cfg):.0f} MB"
    )
    summary = {**cfg.to_dict(), "checkpoint_interval": cfg.checkpoint_interval}
    rungs = [describe_rung(cfg, rung) for rung in range(rung_count(cfg))]
    click.echo(config_summary(str(file), summary, rungs, budget, resume_note(cfg)))


def resume_note(cfg) -> str | None:
    """What a run of ``cfg`` starts from when its adapter_path already holds a checkpoint:
    "resumes from step 84; `loractl retry --fresh` starts over", or None."""
    from loractl.supervisor.jobview import checkpoint_progress

    found = checkpoint_progress(str(cfg.adapter_path))
    if not found or not found.get("step"):
        return None
    return (
        f"resumes from step {found['step']}; `loractl retry --fresh` starts over (after "
        f"`loractl cancel`; the checkpoint is in {printable(cfg.adapter_path)})"
    )


def warn(warnings) -> None:
    """Keys mlx_lm.lora would ignore, and the like: said on stderr, never fatal."""
    for warning in warnings:
        click.echo(f"loractl: warning: {printable(warning)}", err=True)


def job_note(data: dict) -> None:
    """What the supervisor warned of in its answer (a JOB name several jobs share, say): on
    stderr, so that text and JSON output stay what they were."""
    warn(data.get("warnings") or [])


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--budget",
    metavar="SIZE",
    default=None,
    help="Memory budget, e.g. 12GB, 900MB or 900 (MB); default: the job's own.",
)
@click.option("--json", "as_json", is_flag=True)
def fit(config, budget, as_json) -> None:
    """Will CONFIG fit in memory? Runs its pre-flight alone (nothing is trained) on rung 0,
    then on the rungs the memory model picks; exits 0 when some rung fits, 1 otherwise."""
    from loractl.client.fit_cmd import FitError, fit_job, fit_table, resolve_budget
    from loractl.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        fail(str(exc), exc.exit_code, as_json=as_json)
        return
    try:
        limit = resolve_budget(cfg, budget)
    except ValueError as exc:
        fail(f"--budget: {exc}", ClientExit.USAGE, as_json=as_json)
        return
    try:
        result = fit_job(config, cfg, limit, say=lambda line: click.echo(line, err=True))
    except FitError as exc:
        fail(str(exc), exc.code, as_json=as_json)
        return
    if as_json:
        emit(result, as_json=True)
    else:
        click.echo(fit_table(result))
    sys.exit(ClientExit.OK if result["fits"] is not None else ClientExit.JOB_FAILED)


@main.command()
@click.option("--json", "as_json", is_flag=True)
def version(as_json) -> None:
    """Print loractl's version and protocol version."""
    emit({"version": __version__, "protocol": PROTOCOL_VERSION}, as_json=as_json)


if __name__ == "__main__":
    main()
