"""Property fuzzing of everything that reads outside input: job configs, protocol frames
(also as multipart messages through wire.drain on real sockets) and inbox entries.

Each property runs 500 examples; a failure is a crash the project must not have, and
hypothesis prints the smallest input that shows it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import yaml
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from loractl.config import ConfigError, JobConfig, iter_fields, load_config, parse_config
from loractl.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Heartbeat,
    Message,
    ProtocolError,
    StatusRequest,
    decode,
)
from loractl.supervisor.inbox import CONFIG_SUFFIXES, Accepted, Inbox, Rejected
from loractl.wire import drain

FUZZ = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def workspace():
    """A model and a data folder that exist, so configs get past the path checks."""
    folder = Path(tempfile.mkdtemp(prefix="lc-fuzz-", dir="/tmp"))
    (folder / "model").mkdir()
    (folder / "data").mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# -- job configs -------------------------------------------------------------------------------

FIELDS = [info.name for info in iter_fields()]
# Keys that appear inside the nested mappings (lora_parameters, ladder rungs, lr_schedule,
# optimizer_config, hf_dataset), so fuzzing reaches the checks below the top level.
SUBKEYS = [
    "rank", "scale", "dropout", "keys", "name", "arguments", "warmup", "warmup_init",
    "adamw", "adam", "sgd", "weight_decay", "path", "train_split", "valid_split",
    "prompt_feature", "config", *FIELDS[:20],
]  # fmt: skip
WORDS = [
    "model", "data", "org/name", "adamw", "cosine_decay", "lora", "dora", "full", "1e-5",
    "2GB", "512MB", "-1", "", "wandb", "none", "~", "../..", "/", "yes", "NaN",
]  # fmt: skip
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(WORDS)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(SUBKEYS) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
mappings = st.builds(
    lambda base, extra: {**base, **extra},
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.sampled_from(["model", "./model", "org/name"]) | scalars,
            "data": st.sampled_from(["data", "org/set"]) | scalars,
        },
    ),
    st.dictionaries(
        st.sampled_from(FIELDS) | st.text(max_size=12) | st.integers(), values, max_size=6
    ),
)


@FUZZ
@given(data=mappings)
def test_fuzzed_config_mappings_validate_or_raise_config_error(workspace, data):
    """Any mapping is either a JobConfig or a ConfigError: no other exception escapes."""
    try:
        cfg = parse_config(data, workspace, "fuzz.yaml")
    except ConfigError as error:
        assert str(error)
        return
    assert isinstance(cfg, JobConfig)


def _dump(kind: str, data) -> str:
    if kind == "json":
        return json.dumps(data, default=str)
    if kind == "toml":
        lines = []
        for key, value in data.items():
            lines.append(f"{json.dumps(str(key))} = {json.dumps(value, default=str)}")
        return "\n".join(lines)
    return yaml.safe_dump(data, allow_unicode=True)


# Hand-picked nasties on top of random text: aliases (a billion laughs in small), tags that
# would run code under an unsafe loader, merge keys, deep nesting, tabs, NULs, BOMs.
SNIPPETS = [
    "a: &a [1, 2]\nb: [*a, *a, *a]\n",
    "x: !!python/object/apply:os.system [ls]\n",
    "base: &b {batch_size: 2}\nlora_parameters:\n  <<: *b\n",
    "model: " + "[" * 200 + "]" * 200 + "\n",
    "lora_parameters:\n\trank: 4\n",
    "\ufeffmodel: model\ndata: data\n",
    "model: model\x00\n",
    "? [complex, key]\n: value\n",
    "model: model\ndata: data\nladder: " + json.dumps([{"batch_size": i} for i in range(50)]),
    "model = 'model'\ndata = 'data'\n[lora_parameters]\nrank = 4\n",
    '{"model": "model", "data": "data", "iters": 1e400}',
    '{"model": "model", "data": "data", "iters": NaN}',
]


config_files = st.one_of(
    st.tuples(st.sampled_from(["yaml", "json", "toml"]), mappings).map(
        lambda pair: (pair[0], _dump(*pair))
    ),
    st.tuples(st.sampled_from(["yaml", "yml", "json", "toml"]), st.sampled_from(SNIPPETS)),
    st.tuples(st.sampled_from(["yaml", "json", "toml", "txt"]), st.text(max_size=200)),
    st.tuples(
        st.sampled_from(["yaml", "json", "toml"]),
        st.binary(max_size=200).map(lambda raw: raw.decode("latin-1")),
    ),
)


@FUZZ
@given(file=config_files, cut=st.integers(min_value=0, max_value=400))
def test_fuzzed_config_files_load_or_raise_config_error(workspace, file, cut):
    """Any file content (whole or truncated) under any suffix loads or raises ConfigError."""
    suffix, text = file
    path = workspace / f"job.{suffix}"
    data = text.encode("utf-8", "surrogatepass")
    path.write_bytes(data[:cut] if cut < len(data) else data)
    try:
        cfg = load_config(path)
    except ConfigError as error:
        assert str(error)
        return
    assert isinstance(cfg, JobConfig)


# -- protocol frames ---------------------------------------------------------------------------

TYPES = ["heartbeat", "trainer_event", "trainer_command", "reply", "status", "submit", "list",
         "cancel", "retry", "priority", "clean", "nope", ""]  # fmt: skip
HEARTBEAT_FIELDS = [f for f in Heartbeat().to_dict() if f not in ("type", "v")]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
messages = st.builds(
    lambda kind, version, fields: json.dumps({"type": kind, "v": version, **fields}).encode(),
    st.sampled_from(TYPES) | st.text(max_size=8),
    st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION + 1, "1", None, 1.0, True]),
    st.dictionaries(
        st.sampled_from([*HEARTBEAT_FIELDS, "action", "job", "ok", "error", "data", "x"]),
        json_values,
        max_size=6,
    ),
)
frames = st.one_of(
    messages,
    st.binary(max_size=300),
    st.builds(lambda beat: beat.encode(), st.builds(Heartbeat, step=st.integers(0, 2**31))),
    st.sampled_from([b"{" * 70000, b"[" * 3000 + b"]" * 3000, b" " * (MAX_MESSAGE_BYTES + 1)]),
)


@FUZZ
@given(frame=frames)
def test_fuzzed_frames_decode_or_raise_protocol_error(frame):
    """decode() returns a message or raises ProtocolError with a code, nothing else; what
    it returns encodes back to an equal message."""
    try:
        message = decode(frame)
    except ProtocolError as error:
        assert error.reason and error.code
        return
    assert isinstance(message, Message)
    has_nan = any(isinstance(v, float) and math.isnan(v) for v in message.to_dict().values())
    if not has_nan:
        assert decode(message.encode()) == message


class Wire:
    """A ROUTER set up like the supervisor's and a DEALER connected to it, with the routing
    id the ROUTER knows the DEALER by."""

    def __init__(self, folder: Path) -> None:
        context = zmq.Context.instance()
        self.router = context.socket(zmq.ROUTER)
        self.dealer = context.socket(zmq.DEALER)
        for sock in (self.router, self.dealer):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        self.router.bind(f"ipc://{folder}/w")
        self.dealer.connect(f"ipc://{folder}/w")
        self.ids = itertools.count()
        self.dealer.send(StatusRequest().encode())
        assert self.router.poll(5000)
        self.identity = self.router.recv_multipart()[0]

    def close(self) -> None:
        self.router.close()
        self.dealer.close()

    def send(self, to_router: bool, parts: list[bytes]) -> None:
        if to_router:
            self.dealer.send_multipart(parts)
        else:
            self.router.send_multipart([self.identity, *parts])

    def read_until(self, sock: zmq.Socket, sentinel: str) -> tuple[list, list[ProtocolError]]:
        """Everything drain() gives until the sentinel message (which it must give)."""
        got: list = []
        drops: list[ProtocolError] = []
        while not any(m.id == sentinel for _, m in got):
            assert sock.poll(5000), "the sentinel never arrived"
            got.extend(drain(sock, drops.append))
        assert got[-1][1].id == sentinel, "nothing is read past the sentinel"
        return got[:-1], drops


@pytest.fixture(scope="module")
def wire():
    folder = tempfile.mkdtemp(prefix="lc-fz-", dir="/tmp")
    pair = Wire(Path(folder))
    yield pair
    pair.close()
    shutil.rmtree(folder, ignore_errors=True)


multiparts = st.lists(
    st.lists(
        # Big frames around the limit cost hypothesis little when they are one byte repeated.
        frames | st.integers(60000, 70000).map(lambda size: b"x" * size) | st.just(b""),
        min_size=1,
        max_size=4,
    ),
    min_size=1,
    max_size=4,
)


def expected(parts: list[bytes]) -> Message | None:
    """What drain must make of a message: its payload decoded, if it is one frame (after the
    routing id on the ROUTER side) that decodes."""
    if len(parts) != 1:
        return None
    try:
        return decode(parts[0])
    except ProtocolError:
        return None


@FUZZ
@given(batch=multiparts)
def test_fuzzed_multipart_messages_through_drain_on_real_sockets(wire, batch):
    """Multipart messages of fuzzed frames, both ways: drain yields exactly the well-formed
    ones, drops and counts every other one, and always reaches the message after them."""
    # Payloads, not messages: decoding fills defaults (id, sent_at) afresh every time.
    want = [parts[0] for parts in batch if expected(parts) is not None]
    for to_router, receiver in ((True, wire.router), (False, wire.dealer)):
        for parts in batch:
            wire.send(to_router, parts)
        sentinel = f"s{next(wire.ids)}"
        wire.send(to_router, [StatusRequest(id=sentinel).encode()])
        got, drops = wire.read_until(receiver, sentinel)
        assert [frames[-1] for frames, _ in got] == want
        if to_router:
            assert all(frames[0] == wire.identity and len(frames) == 2 for frames, _ in got)
        assert len(drops) == len(batch) - len(want)
        assert all(isinstance(error, ProtocolError) and error.reason for error in drops)


# -- inbox entries -----------------------------------------------------------------------------

ENDINGS = [*CONFIG_SUFFIXES, ".YAML", ".tmp", ".part", ".yaml.tmp", ".txt", "", ".error.txt"]
KINDS = ["config", "bad", "empty", "binary", "folder", "link_in", "link_out", "link_dangling",
         "link_folder", "link_loop", "fifo"]  # fmt: skip

plain_names = st.text(
    alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=40,
)
byte_names = st.binary(min_size=1, max_size=40).map(
    lambda raw: os.fsdecode(raw.replace(b"/", b"_").replace(b"\x00", b"_"))
)
long_names = st.builds(
    lambda fill, length: fill * (length // len(fill.encode())),
    st.sampled_from(["a", "\u00e9", "\u6f22", "\U0001f600"]),
    st.integers(min_value=50, max_value=255),
)
stems = st.one_of(
    plain_names,
    byte_names,
    long_names,
    st.builds(lambda name: "." + name, plain_names),
    st.sampled_from(["job", "rejected", "..", "-", " ", "a b", "\n"]),
)


def _fits(name: str) -> bool:
    """A name this file system takes, that is not one the inbox keeps for itself."""
    raw = os.fsencode(name)
    reserved = name in (".", "..", "rejected") or name.startswith(".claim-")
    return 0 < len(raw) <= 255 and not reserved


def shown(name: str) -> str:
    """A file name as the inbox reports it (non-UTF-8 bytes as \\xNN)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


entries = st.dictionaries(
    st.builds(lambda stem, ending: stem + ending, stems, st.sampled_from(ENDINGS)).filter(_fits),
    st.sampled_from(KINDS),
    min_size=1,
    max_size=6,
)


class Queue:
    """The store's part for the inbox: jobs by id, refusing an id twice."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobConfig] = {}

    def enqueue(self, job_id: str, claimed: Path, cfg: JobConfig) -> None:
        if job_id in self.jobs:
            raise ValueError(f"job {job_id} exists")
        self.jobs[job_id] = cfg


def _make(path: Path, kind: str, home: Path, workspace: Path) -> None:
    config = f"model: {workspace / 'model'}\ndata: {workspace / 'data'}\n"
    if kind == "config":
        path.write_text(config)
    elif kind == "bad":
        path.write_text(config + "batch_size: -1\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "binary":
        path.write_bytes(b"\x00\xff\xfe" * 10)
    elif kind == "folder":
        path.mkdir()
        (path / "inside.yaml").write_text(config)
    elif kind == "link_in":
        path.symlink_to(home / "linked.yaml")
    elif kind == "link_out":
        path.symlink_to(workspace / "outside.yaml")
    elif kind == "link_dangling":
        path.symlink_to(home / "nowhere.yaml")
    elif kind == "link_folder":
        path.symlink_to(home / "folder")
    elif kind == "link_loop":
        path.symlink_to(path.name)
    elif kind == "fifo":
        os.mkfifo(path)


def _deliberately_ignored(name: str, kind: str) -> bool:
    lower = name.lower()
    if name.startswith(".") or lower.endswith((".tmp", ".part")):
        return True
    return kind in ("folder", "link_folder") and not lower.endswith(CONFIG_SUFFIXES)


@pytest.fixture(scope="module")
def inbox_root(workspace):
    (workspace / "outside.yaml").write_text("model: m\n")
    return workspace


@FUZZ
@given(made=entries)
def test_fuzzed_inbox_entries_end_accepted_rejected_or_deliberately_ignored(inbox_root, made):
    """Random names (unicode, bytes, very long, hidden, *.tmp, *.part) and kinds (configs,
    garbage, empty files, folders, links of every sort, fifos) through the real Inbox: each
    entry is queued, or rejected with a matching .error.txt, or left alone on purpose;
    nothing is left unhandled and nothing raises."""
    home = Path(tempfile.mkdtemp(prefix="h-", dir=inbox_root))
    try:
        _check_inbox(home, inbox_root, made)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _check_inbox(home: Path, workspace: Path, made: dict[str, str]) -> None:
    inbox = home / "inbox"
    inbox.mkdir()
    (home / "folder").mkdir()
    (home / "linked.yaml").write_text(f"model: {workspace / 'model'}\ndata: {workspace / 'data'}\n")
    for name, kind in made.items():
        try:
            _make(inbox / name, kind, home, workspace)
        except OSError:
            assume(False)  # a name this file system refuses is not the inbox's to handle
    queue = Queue()
    ids = itertools.count()
    box = Inbox(
        inbox,
        home,
        enqueue=queue.enqueue,
        is_known=lambda job_id: job_id in queue.jobs,
        new_id=lambda: f"f{next(ids):011d}",
        settle_s=0,
        budget_s=10,
    )
    results: list[Accepted | Rejected] = []
    with capture_logs() as logs:
        for _ in range(3):  # one poll takes everything; the others must find nothing new
            results.extend(box.poll())
    assert [entry for entry in logs if entry["log_level"] in ("error", "critical")] == []
    taken = {r.source for r in results if isinstance(r, Accepted)}
    refused = {r.name: r for r in results if isinstance(r, Rejected)}
    assert len(taken) + len(refused) == len(results), "an entry was handled twice"
    left = set(os.listdir(inbox)) - {"rejected"}
    # poll() makes rejected/ when it first rejects (start(), which would make it at once,
    # also starts an observer thread, too slow to do 500 times).
    listing = os.listdir(inbox / "rejected") if (inbox / "rejected").exists() else []
    in_rejected = {shown(n): n for n in listing}
    for name, kind in made.items():
        if _deliberately_ignored(name, kind):
            assert name in left and shown(name) not in taken, (name, kind)
            assert shown(name) not in refused, (name, kind)
            continue
        assert name not in left, f"left unhandled: {name!r} ({kind})"
        if shown(name) in taken:
            assert kind in ("config", "link_in") and name.lower().endswith(CONFIG_SUFFIXES)
            continue
        rejection = refused[shown(name)]
        assert "internal error" not in rejection.reason, rejection.reason
        assert rejection.reason.startswith(f"{shown(name)}: ")
        stored = inbox / "rejected" / in_rejected[rejection.stored]
        assert os.path.lexists(stored)
        assert len(os.fsencode(stored.name + ".error.txt")) <= 255
        error_file = inbox / "rejected" / in_rejected[rejection.stored + ".error.txt"]
        assert stat.S_ISREG(os.lstat(error_file).st_mode)
        # Bytes, not read_text: a name may hold a \r, which universal newlines would turn.
        assert error_file.read_bytes().decode() == rejection.reason + "\n"
    assert len(queue.jobs) == len(taken)
    assert left == {n for n, k in made.items() if _deliberately_ignored(n, k)}
    assert len(in_rejected) == 2 * len(refused), "one stored entry and one error file each"
