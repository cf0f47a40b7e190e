"""Tests for loractl.supervisor.inbox: real files, a real watchdog observer, temp folders."""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path

import pytest

from loractl.client.harness import wait_for
from loractl.config import JobConfig
from loractl.supervisor import inbox as inbox_module
from loractl.supervisor.inbox import Accepted, Inbox, Rejected


class Crash(BaseException):
    """Stands in for the process dying: poll() lets it through like SIGKILL would."""


class FakeQueue:
    """What the supervisor's store does for the inbox: jobs by id, refusing an id twice."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[str, JobConfig]] = {}
        self.calls: list[str] = []
        self.fail: BaseException | None = None  # raised before storing
        self.fail_after: BaseException | None = None  # raised after storing

    def enqueue(self, job_id: str, claimed: Path, cfg: JobConfig) -> None:
        assert claimed.is_file(), "the claim must still exist while enqueue runs"
        self.calls.append(job_id)
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        if job_id in self.jobs:
            raise ValueError(f"job {job_id} exists")
        self.jobs[job_id] = (claimed.name, cfg)
        if self.fail_after is not None:
            error, self.fail_after = self.fail_after, None
            raise error

    def is_known(self, job_id: str) -> bool:
        return job_id in self.jobs


class World:
    """A loractl home with an inbox, a model and data folder, and inboxes stopped at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.inbox = self.home / "inbox"
        self.inbox.mkdir(parents=True)
        self.model = root / "model"
        self.data = root / "data"
        self.model.mkdir()
        self.data.mkdir()
        self.queue = FakeQueue()
        self._ids = itertools.count()
        self.inboxes: list[Inbox] = []

    def new_id(self) -> str:
        return f"j{next(self._ids):05d}"

    def make(self, *, start: bool = True, settle_s: float = 0.2, **kwargs) -> Inbox:
        kwargs.setdefault("new_id", self.new_id)
        box = Inbox(
            self.inbox,
            self.home,
            enqueue=self.queue.enqueue,
            is_known=self.queue.is_known,
            settle_s=settle_s,
            **kwargs,
        )
        self.inboxes.append(box)
        if start:
            box.start()
        return box

    def config(self, name: str = "", suffix: str = ".yaml") -> str:
        values = {"model": str(self.model), "data": str(self.data)}
        if name:
            values["name"] = name
        if suffix == ".json":
            return json.dumps(values)
        if suffix == ".toml":
            return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
        return "".join(f"{key}: {value}\n" for key, value in values.items())

    def drop(self, name: str, text: str | bytes) -> Path:
        path = self.inbox / name
        if isinstance(text, str):
            text = text.encode()
        path.write_bytes(text)
        return path

    def listing(self) -> set[str]:
        return set(os.listdir(self.inbox))

    def rejected(self) -> set[str]:
        return set(os.listdir(self.inbox / "rejected"))


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    for box in w.inboxes:
        box.stop()


def poll_until(box: Inbox, done, timeout: float = 20) -> list[Accepted | Rejected]:
    """Poll like the supervisor loop does until ``done(results)`` holds."""
    results: list[Accepted | Rejected] = []

    def step():
        results.extend(box.poll())
        return done(results)

    wait_for(step, timeout, interval=0.02)
    return results


def accepted(results) -> list[Accepted]:
    return [r for r in results if isinstance(r, Accepted)]


def rejected(results) -> list[Rejected]:
    return [r for r in results if isinstance(r, Rejected)]


def quiet(box: Inbox) -> list[Accepted | Rejected]:
    """Force a full rescan and let anything it finds settle; returns what that turned up."""
    later = time.monotonic() + 3 * box.rescan_s
    return box.poll(later) + box.poll(later + box.settle_s + 0.01)


# -- many files at once ------------------------------------------------------------------------


SUFFIXES = (".yaml", ".yml", ".json", ".toml")


def write_many(world: World, count: int) -> dict[str, str]:
    """Write ``count`` configs the ways people do: half, pause, rest; or .tmp then rename."""
    expected = {}
    for i in range(count):
        suffix = SUFFIXES[i % len(SUFFIXES)]
        name = f"job-{i:03d}{suffix}"
        text = world.config(name=f"n{i:03d}", suffix=suffix)
        expected[name] = f"n{i:03d}"
        if i % 5 == 0:
            temp = world.inbox / f"{name}.tmp"
            temp.write_text(text)
            os.rename(temp, world.inbox / name)
            continue
        with open(world.inbox / name, "w") as fh:
            fh.write(text[: len(text) // 2])
            fh.flush()
            if i % 10 == 1:
                time.sleep(0.02)
            fh.write(text[len(text) // 2 :])
    return expected


def check_all_taken(world: World, box: Inbox, results, expected: dict[str, str]) -> None:
    assert rejected(results) == []
    taken = accepted(results)
    assert len(taken) == len(expected)
    assert len(world.queue.jobs) == len(expected)
    assert len(world.queue.calls) == len(set(world.queue.calls)), "an id was enqueued twice"
    assert len({a.source for a in taken}) == len(expected), "a file was enqueued twice"
    assert {a.source: a.name for a in taken} == expected
    assert {cfg.name for _, cfg in world.queue.jobs.values()} == set(expected.values())
    assert quiet(box) == []
    assert world.listing() == {"rejected"}
    assert world.rejected() == set()


def test_500_files_dropped_while_running_are_each_queued_once(world):
    """500 configs written non-atomically (or via .tmp + rename) while running: 500 jobs."""
    box = world.make()
    expected: dict[str, str] = {}
    writer = threading.Thread(target=lambda: expected.update(write_many(world, 500)))
    writer.start()
    try:
        results = poll_until(
            box,
            lambda r: not writer.is_alive() and len(r) >= 500 and box.pending_count == 0,
        )
    finally:
        writer.join()
    check_all_taken(world, box, results, expected)


def test_500_files_waiting_before_start_are_each_queued_once(world):
    """Files that arrived while the daemon was down are all picked up at start, once each."""
    expected = write_many(world, 500)
    box = world.make()
    results = poll_until(box, lambda r: len(r) >= 500 and box.pending_count == 0)
    check_all_taken(world, box, results, expected)


# -- what is ignored, what waits ---------------------------------------------------------------


def test_hidden_tmp_part_and_folders_are_ignored_and_left_in_place(world):
    """Hidden, *.tmp, *.part files and data folders (and links to them) are neither taken
    nor rejected."""
    ignored = [".hidden.yaml", "x.yaml.tmp", "y.yaml.part", "Z.YAML.TMP", ".DS_Store"]
    for name in ignored:
        world.drop(name, world.config())
    (world.inbox / "sub").mkdir()
    (world.inbox / "sub" / "inner.yaml").write_text(world.config())
    (world.inbox / "linked-dir").symlink_to(world.inbox / "sub")
    (world.inbox / "folder.yaml.part").mkdir()
    box = world.make()
    world.drop("real.yaml", world.config())
    results = poll_until(box, lambda r: len(r) == 1)
    assert [a.source for a in accepted(results)] == ["real.yaml"]
    assert quiet(box) == []
    assert box.pending_count == 0
    assert world.listing() == {*ignored, "sub", "linked-dir", "folder.yaml.part", "rejected"}
    assert world.rejected() == set()
    assert (world.inbox / "sub" / "inner.yaml").exists()


def test_a_folder_named_like_a_config_is_rejected_with_the_reason(world):
    """A folder (or a link to one) named *.yaml is a mistake, not data: it is moved to
    rejected/ whole, with an error file saying it is a folder."""
    box = world.make(settle_s=0.05)
    (world.inbox / "job.yaml").mkdir()
    (world.inbox / "job.yaml" / "config.yaml").write_text(world.config())
    target = world.home / "elsewhere"
    target.mkdir()
    (world.inbox / "link.yml").symlink_to(target)
    results = poll_until(box, lambda r: len(r) == 2)
    reasons = {r.name: r.reason for r in rejected(results)}
    assert reasons["job.yaml"].startswith("job.yaml: a folder, not a config file")
    assert reasons["link.yml"].startswith(f"link.yml: symlink to {target}: a folder")
    assert world.listing() == {"rejected"}
    assert (world.inbox / "rejected" / "job.yaml" / "config.yaml").is_file()
    assert os.readlink(world.inbox / "rejected" / "link.yml") == str(target)
    assert target.is_dir(), "the link's target is left alone"
    for name, reason in reasons.items():
        assert (world.inbox / "rejected" / f"{name}.error.txt").read_text() == reason + "\n"


def test_a_file_is_taken_only_after_its_size_and_mtime_settle(world):
    """A file still growing is not read; once unchanged for settle_s it is."""
    box = world.make(start=False, settle_s=0.5)
    text = world.config(name="grows")
    path = world.drop("grow.yaml", text[:10])
    assert box.poll(100.0) == []
    with open(path, "a") as fh:
        fh.write(text[10:])
    assert box.poll(100.6) == []  # changed since the last look: the wait starts again
    assert box.poll(101.0) == []  # unchanged, but for 0.4 s only
    assert box.pending_count == 1
    results = box.poll(101.2)
    assert [(a.source, a.name) for a in accepted(results)] == [("grow.yaml", "grows")]
    assert box.pending_count == 0


def test_periodic_rescan_finds_files_without_any_event(world):
    """Without an observer (or after dropped events), the ~2 s rescan still finds new files."""
    box = world.make(start=False, settle_s=0.5)
    assert box.poll(10.0) == []
    world.drop("late.yaml", world.config())
    assert box.poll(11.0) == []
    assert box.pending_count == 0  # nobody has told the inbox yet
    assert box.poll(12.1) == []  # the rescan sees it: settling starts
    assert [a.source for a in accepted(box.poll(12.7))] == ["late.yaml"]


def test_observer_calls_wake_when_a_file_arrives(world):
    """watchdog's thread only records the name and calls wake(); the loop then takes it."""
    woken = threading.Event()
    box = world.make(wake=woken.set)
    box.poll()
    woken.clear()
    world.drop("ping.yaml", world.config())
    wait_for(woken.is_set, 10)
    assert world.queue.jobs == {}, "nothing is done on the observer thread"
    assert box.pending_count == 1
    results = poll_until(box, lambda r: len(r) == 1)
    assert accepted(results)[0].source == "ping.yaml"


# -- accepted files ----------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_inbox_and_name_comes_from_the_file(world):
    """A claimed file stays in the inbox, so relative paths and the default name still work."""
    (world.inbox / "models" / "m").mkdir(parents=True)
    (world.inbox / "d").mkdir()
    box = world.make()
    world.drop("my job.yaml", "model: models/m\ndata: d\n")
    results = poll_until(box, lambda r: len(r) == 1)
    (job,) = accepted(results)
    assert job.name == "my-job"
    claim_name, cfg = world.queue.jobs[job.job_id]
    assert claim_name == f".claim-{job.job_id}-my job.yaml"
    assert cfg.model == str(world.inbox / "models" / "m")
    assert cfg.data == str(world.inbox / "d")
    assert cfg.name == "my-job"


def test_symlink_inside_home_is_accepted_and_its_target_left_alone(world):
    """A link to a config inside the home folder is fine; only the link is consumed."""
    target = world.home / "configs" / "real.yaml"
    target.parent.mkdir()
    target.write_text(world.config(name="linked"))
    (world.inbox / "link.yaml").symlink_to(target)
    box = world.make()
    results = poll_until(box, lambda r: len(r) == 1)
    assert [(a.source, a.name) for a in accepted(results)] == [("link.yaml", "linked")]
    assert target.read_text() == world.config(name="linked")
    assert world.listing() == {"rejected"}


# -- rejected files ----------------------------------------------------------------------------


def _corpus(world: World) -> dict[str, tuple[object, str]]:
    """name -> (content, or a function making the file; a substring its error must contain)."""
    head = f"model: {world.model}\ndata: {world.data}\n"
    outside = world.root / "outside" / "secret.yaml"
    outside.parent.mkdir()
    outside.write_text(world.config())

    def link(target):
        return lambda path: path.symlink_to(target)

    return {
        "bad_yaml.yaml": (head + "lora_parameters: [unclosed\n", "YAML error"),
        "tabs.yaml": (head + "lora_parameters:\n\trank: 4\n", "YAML error"),
        "unknown_key.yaml": (head + "batch_sise: 4\n", "did you mean 'batch_size'"),
        "wrong_type.yaml": (head + "batch_size: four\n", "key 'batch_size'"),
        "bool_as_int.yaml": (head + "batch_size: true\n", "got True"),
        "negative_lr.yaml": (head + "learning_rate: -1\n", "key 'learning_rate'"),
        "negative_iters.yaml": (head + "iters: -5\n", "expected an integer >= 1, got -5"),
        "float_seed.yaml": (head + "seed: 1.5\n", "key 'seed'"),
        "missing_model.yaml": (f"data: {world.data}\n", "missing required key 'model'"),
        "missing_data.yaml": (f"model: {world.model}\n", "missing required key 'data'"),
        "ladder_unknown.yaml": (head + "ladder: [{bogus: 1}]\n", "unknown key 'ladder[0].bogus'"),
        "ladder_zero.yaml": (head + "ladder: [{batch_size: 0}]\n", "ladder[0].batch_size"),
        "rank_zero.yaml": (head + "lora_parameters: {rank: 0}\n", "lora_parameters.rank"),
        "bad_choice.yaml": (head + "fine_tune_type: bogus\n", "key 'fine_tune_type'"),
        "train_false.yaml": (head + "train: false\n", "key 'train'"),
        "heartbeat.yaml": (head + "heartbeat_timeout: 1\n", "heartbeat_timeout"),
        "two_budgets.yaml": (
            head + "memory_budget_mb: 100\nmemory_budget_gb: 1\n",
            "both set",
        ),
        "optimizer_arg.yaml": (
            head + "optimizer: adamw\noptimizer_config: {adamw: {bogus: 1}}\n",
            "optimizer_config.adamw.bogus",
        ),
        "python_tag.yaml": (head + "x: !!python/object/apply:os.system [ls]\n", "safe loader"),
        "duplicate.yaml": (head + "model: again\n", "duplicate key 'model'"),
        "int_key.yaml": (head + "1: x\n", "keys must be strings"),
        "model_nowhere.yaml": (
            f"model: ./nowhere\ndata: {world.data}\n",
            f"path '{world.inbox / 'nowhere'}' does not exist",
        ),
        "data_nowhere.yaml": (
            f"model: {world.model}\ndata: /nowhere/at/all\n",
            "path '/nowhere/at/all' does not exist",
        ),
        "binary.yaml": (b"model: x\n\x00\x01\x02garbage", "binary data (NUL byte)"),
        "non_utf8.yaml": (b"model: caf\xe9\n", "not valid UTF-8"),
        "huge.yaml": (b"# " + b"x" * 2_000_000, "file is 2000002 bytes"),
        "empty.yaml": (b"", "the file is empty"),
        "comments.yaml": ("# nothing here\n", "only comments"),
        "top_list.yaml": ("- model: x\n- data: y\n", "top level must be a mapping"),
        "bad.json": ('{"model": ', "JSON error"),
        "list.json": ("[1, 2]", "top level must be a mapping"),
        "unknown.json": (
            json.dumps({"model": str(world.model), "data": str(world.data), "batch_sise": 1}),
            "'batch_sise'",
        ),
        "bad.toml": ("model = \n", "TOML error"),
        "job.txt": (head, "unsupported file type '.txt'; the inbox takes .yaml"),
        "README": ("hello\n", "unsupported file type (no suffix)"),
        "passwd.yaml": (link("/etc/passwd"), "symlink to /etc/passwd points outside"),
        "secret.yaml": (link(outside), "points outside loractl's home"),
        "dangling.yaml": (link(world.home / "gone.yaml"), "cannot be followed"),
        "fifo.yaml": (os.mkfifo, "not a regular file"),
        "folder.yaml": (os.mkdir, "a folder, not a config file"),
        "folder_link.json": (link(world.home), "a folder, not a config file"),
        "UPPER.YAML": (os.mkdir, "a folder"),
    }


def test_invalid_configs_are_rejected_with_the_reason_and_the_inbox_keeps_working(world):
    """Each broken file goes to rejected/ with an error file naming its problem."""
    corpus = _corpus(world)
    assert len(corpus) >= 30
    box = world.make(settle_s=0.1)
    for name, (content, _) in corpus.items():
        if callable(content):
            content(world.inbox / name)
        else:
            world.drop(name, content)
    results = poll_until(box, lambda r: len(r) >= len(corpus) and box.pending_count == 0)
    assert accepted(results) == []
    by_name = {r.name: r.reason for r in rejected(results)}
    assert set(by_name) == set(corpus)
    for name, (_, expected) in corpus.items():
        error_text = (world.inbox / "rejected" / f"{name}.error.txt").read_text()
        assert expected in error_text, (name, error_text)
        assert error_text == by_name[name] + "\n"
        assert error_text.startswith(f"{name}: "), "the error names the file, not its claim"
        assert os.path.lexists(world.inbox / "rejected" / name)
    assert world.listing() == {"rejected"}
    # A symlink is moved as a link; what it points to is never touched.
    assert os.readlink(world.inbox / "rejected" / "passwd.yaml") == "/etc/passwd"
    assert (world.root / "outside" / "secret.yaml").read_text() == world.config()
    assert Path("/etc/passwd").exists()

    world.drop("after.yaml", world.config(name="after"))
    results = poll_until(box, lambda r: len(r) == 1)
    assert [(a.source, a.name) for a in accepted(results)] == [("after.yaml", "after")]


def test_file_names_that_are_not_utf8_are_handled_not_stuck(world):
    """Linux allows any bytes in a name; such files are still taken or rejected."""
    good = os.fsdecode(b"caf\xe9.yaml")
    bad = os.fsdecode(b"b\xe9d.yaml")
    try:
        world.drop(good, world.config(name="cafe"))
    except OSError:
        pytest.skip("this file system only allows UTF-8 names")
    world.drop(bad, "batch_sise: 1\n")
    box = world.make(settle_s=0.05)
    results = poll_until(box, lambda r: len(r) == 2)
    assert [(a.source, a.name) for a in accepted(results)] == [("caf\\xe9.yaml", "cafe")]
    assert [r.reason for r in rejected(results)] == [
        "b\\xe9d.yaml: unknown key 'batch_sise' (did you mean 'batch_size'?)"
    ]
    assert world.listing() == {"rejected"}
    assert world.rejected() == {bad, f"{bad}.error.txt"}


def test_rejecting_a_name_twice_never_overwrites(world):
    """A second bad file of the same name gets a numbered name and its own error file."""
    box = world.make(settle_s=0.05)
    world.drop("bad.yaml", "batch_size: [\n")
    poll_until(box, lambda r: len(r) == 1)
    world.drop("bad.yaml", "batch_sise: 1\n")
    poll_until(box, lambda r: len(r) == 1)
    assert world.rejected() == {
        "bad.yaml",
        "bad.yaml.error.txt",
        "bad-1.yaml",
        "bad-1.yaml.error.txt",
    }
    rejected_dir = world.inbox / "rejected"
    assert (rejected_dir / "bad.yaml").read_text() == "batch_size: [\n"
    assert "YAML error" in (rejected_dir / "bad.yaml.error.txt").read_text()
    assert (rejected_dir / "bad-1.yaml").read_text() == "batch_sise: 1\n"
    assert "unknown key 'batch_sise'" in (rejected_dir / "bad-1.yaml.error.txt").read_text()


def test_unexpected_errors_reject_the_file_and_poll_goes_on(world):
    """An exception while taking one file rejects that file; poll() itself never raises."""
    calls = itertools.count()

    def flaky_id() -> str:
        if next(calls) == 0:
            raise RuntimeError("id source broke")
        return world.new_id()

    box = world.make(settle_s=0.05, new_id=flaky_id)
    world.drop("a.yaml", world.config(name="a"))
    (first,) = poll_until(box, lambda r: len(r) == 1)
    assert isinstance(first, Rejected)
    assert "internal error: RuntimeError: id source broke" in first.reason
    assert first.reason in (world.inbox / "rejected" / "a.yaml.error.txt").read_text()

    world.queue.fail = OSError("disk full")
    world.drop("b.yaml", world.config(name="b"))
    (second,) = poll_until(box, lambda r: len(r) == 1)
    assert isinstance(second, Rejected)
    assert second.reason == "b.yaml: could not queue the job: disk full"
    assert world.queue.jobs == {}

    world.drop("c.yaml", world.config(name="c"))
    (third,) = poll_until(box, lambda r: len(r) == 1)
    assert isinstance(third, Accepted) and third.name == "c"
    assert world.listing() == {"rejected"}


def test_enqueue_that_fails_after_storing_counts_as_queued(world):
    """If enqueue raises but the job was stored, the file is not also rejected (no double)."""
    world.queue.fail_after = RuntimeError("event log write failed")
    box = world.make(settle_s=0.05)
    world.drop("stored.yaml", world.config(name="stored"))
    (result,) = poll_until(box, lambda r: len(r) == 1)
    assert isinstance(result, Accepted)
    assert list(world.queue.jobs) == [result.job_id]
    assert world.listing() == {"rejected"}
    assert world.rejected() == set()


# -- crash safety ------------------------------------------------------------------------------


def _crash_in_load_config(world, monkeypatch):
    def crash(path):
        raise Crash

    monkeypatch.setattr(inbox_module, "load_config", crash)


def _crash_in_enqueue_before_storing(world, monkeypatch):
    world.queue.fail = Crash()


def _crash_after_storing(world, monkeypatch):
    world.queue.fail_after = Crash()


@pytest.mark.parametrize(
    "crash, calls, taken_on_restart",
    [
        (_crash_in_load_config, 1, True),  # claimed, never enqueued: enqueued on restart
        (_crash_in_enqueue_before_storing, 2, True),  # enqueue runs again with the same id
        (_crash_after_storing, 1, False),  # already stored: the restart deletes the claim
    ],
)
def test_crash_between_claim_and_delete_neither_loses_nor_doubles(
    world, monkeypatch, crash, calls, taken_on_restart
):
    """A crash at each step after the claim leaves a claim that a restart finishes once."""
    crash(world, monkeypatch)
    first = world.make(settle_s=0.05)
    world.drop("job.yaml", world.config(name="survivor"))
    with pytest.raises(Crash):
        wait_for(first.poll, 10)
    first.stop()
    monkeypatch.undo()
    (claim,) = world.listing() - {"rejected"}
    assert claim.startswith(".claim-j") and claim.endswith("-job.yaml")
    job_id = claim.removeprefix(".claim-").removesuffix("-job.yaml")

    second = world.make(settle_s=0.05)
    results = poll_until(second, lambda r: world.listing() == {"rejected"})
    assert list(world.queue.jobs) == [job_id]
    assert world.queue.jobs[job_id][1].name == "survivor"
    assert world.queue.calls == [job_id] * calls
    assert [a.job_id for a in accepted(results)] == ([job_id] if taken_on_restart else [])
    assert quiet(second) == []
    assert world.rejected() == set()


def test_leftover_claims_found_at_start_are_finished_or_dropped(world):
    """Claims left by a crash: known ids are deleted, unknown ones enqueued or rejected."""
    world.queue.jobs["k0001"] = (".claim-k0001-done.yaml", None)
    world.drop(".claim-k0001-done.yaml", world.config(name="done"))
    world.drop(".claim-u0001-todo.yaml", world.config(name="todo"))
    world.drop(".claim-u0002-broken.yaml", world.config() + "batch_sise: 1\n")
    world.drop(".claim-u0003-notes.txt", "hello\n")
    box = world.make()
    results = poll_until(box, lambda r: len(r) == 3)
    assert [(a.job_id, a.source, a.name) for a in accepted(results)] == [
        ("u0001", "todo.yaml", "todo")
    ]
    assert sorted(r.name for r in rejected(results)) == ["broken.yaml", "notes.txt"]
    assert world.queue.calls == ["u0001"]
    assert set(world.queue.jobs) == {"k0001", "u0001"}
    assert world.listing() == {"rejected"}
    assert world.rejected() == {
        "broken.yaml",
        "broken.yaml.error.txt",
        "notes.txt",
        "notes.txt.error.txt",
    }
    assert (
        "broken.yaml: unknown key 'batch_sise'"
        in (world.inbox / "rejected" / "broken.yaml.error.txt").read_text()
    )


def test_new_id_that_repeats_a_known_id_is_retried(world):
    """A new_id that repeats a known id is retried, so two files never share a job id."""
    ids = iter(["dup", "dup", "fresh"])
    world.queue.jobs["dup"] = ("x", None)
    box = world.make(settle_s=0.05, new_id=lambda: next(ids))
    world.drop("one.yaml", world.config(name="one"))
    (result,) = poll_until(box, lambda r: len(r) == 1)
    assert isinstance(result, Accepted) and result.job_id == "fresh"
    assert world.queue.calls == ["fresh"]


# -- names too long to claim -------------------------------------------------------------------


def claim_limit(world: World) -> int:
    """The longest name the inbox can claim with World's ids (.claim-j00000-<name>)."""
    return 255 - len(".claim-j00000-")


def named(length: int, suffix: str = ".yaml", fill: str = "n", last: str = "") -> str:
    """A name of exactly ``length`` bytes: ``fill`` repeated, padded, ``last``, ``suffix``."""
    end = last + suffix
    stem = fill * ((length - len(end.encode())) // len(fill.encode()))
    stem += "n" * (length - len((stem + end).encode()))
    return stem + end


def test_the_longest_claimable_name_is_accepted_and_one_byte_more_rejected(world):
    """At the claim limit a config is queued; one byte over, it is rejected saying why."""
    box = world.make(settle_s=0.05)
    limit = claim_limit(world)
    fits, over = named(limit), named(limit + 1, fill="o")
    world.drop(fits, world.config(name="fits"))
    world.drop(over, world.config(name="over"))
    results = poll_until(box, lambda r: len(r) == 2)
    assert [a.name for a in accepted(results)] == ["fits"]
    (rejection,) = rejected(results)
    assert rejection.name == over and rejection.stored == over
    assert rejection.reason == (
        f"{over}: the name is {limit + 1} bytes long; the inbox takes names of at most {limit}"
        " bytes (it renames a file to .claim-<job id>-<name> while reading it, and this file"
        " system allows 255 bytes per name); rename the file and drop it in again"
    )
    assert world.listing() == {"rejected"}
    assert world.rejected() == {over, f"{over}.error.txt"}


@pytest.mark.parametrize("fill", ["n", "\u00e9", "\u6f22", "\U0001f600"])
def test_names_up_to_the_limit_are_rejected_under_a_short_unique_name(world, fill):
    """255-byte names (ASCII or multi-byte) are stored under shortened names that, with their
    .error.txt, fit the name limit; names sharing a long beginning stay apart, and each error
    file gives the full original name."""
    box = world.make(settle_s=0.05)
    first = named(255, fill=fill, last="a")
    second = named(255, fill=fill, last="b")
    third = named(255, suffix=".unusually-long-suffix", fill=fill)
    assert len({len(n.encode()) for n in (first, second, third)}) == 1
    for name in (first, second, third):
        world.drop(name, world.config())
    results = poll_until(box, lambda r: len(r) == 3)
    stored = {r.name: r.stored for r in rejected(results)}
    assert set(stored) == {first, second, third}
    assert len(set(stored.values())) == 3
    assert world.listing() == {"rejected"}
    for name, short in stored.items():
        assert len(short.encode()) <= 255 - len(".error.txt")
        error = (world.inbox / "rejected" / f"{short}.error.txt").read_text()
        assert error.startswith(f"{name}: the name is 255 bytes long")
        assert (world.inbox / "rejected" / short).read_text() == world.config()
    assert stored[first].endswith(".yaml") and stored[second].endswith(".yaml")
    assert "~" in stored[third] and not stored[third].endswith(".unusually-long-suffix")
    assert (
        "unsupported file type"
        in (world.inbox / "rejected" / f"{stored[third]}.error.txt").read_text()
    )


def test_a_long_name_rejected_twice_gets_a_numbered_short_name(world):
    """The same long name dropped again is stored beside the first, never over it."""
    box = world.make(settle_s=0.05)
    name = named(250)
    world.drop(name, "first\n")
    (one,) = poll_until(box, lambda r: len(r) == 1)
    world.drop(name, "second\n")
    (two,) = poll_until(box, lambda r: len(r) == 1)
    assert one.stored != two.stored
    assert two.stored.endswith(one.stored.removesuffix(".yaml")[-9:] + "-1.yaml")
    assert (world.inbox / "rejected" / one.stored).read_text() == "first\n"
    assert (world.inbox / "rejected" / two.stored).read_text() == "second\n"
    assert len(world.rejected()) == 4


def test_reasons_quoting_non_utf8_link_targets_are_printable_text(world):
    """A link whose target is not UTF-8 is rejected with a reason that can be logged and
    sent (no lone surrogates), and the error file says the same."""
    box = world.make(settle_s=0.05)
    target = os.fsdecode(b"gone-\xff.yaml")
    try:
        (world.inbox / "link.yaml").symlink_to(target)
    except OSError:
        pytest.skip("this file system only allows UTF-8 names")
    (result,) = poll_until(box, lambda r: len(r) == 1)
    assert result.reason == "link.yaml: symlink to gone-\\xff.yaml cannot be followed" + (
        " (dangling or a loop)"
    )
    result.reason.encode("utf-8")
    error_file = world.inbox / "rejected" / "link.yaml.error.txt"
    assert error_file.read_text(encoding="utf-8") == result.reason + "\n"
