"""The pre-flight: the attempt's longest batch, run before its first step, on the real trainer."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import zmq
from test_trainer import (
    JOB,
    VARLEN_JOB,
    adapter_digest,
    kill_at_step,
    logged_steps,
    start,
    varlen_data,  # noqa: F401  (a fixture)
)

from conftest import make_job, run_trainer, trainer_command, trainer_env, wait_for
from loractl.daemon.data import ExampleOrder, TokenizedDataset, make_batch
from loractl.daemon.faults import FaultInjector
from loractl.daemon.preflight import (
    default_budget_mb,
    longest_eval_batch,
    longest_train_batch,
    run_preflight,
)
from loractl.protocol import ExitCode, TrainerEvent, decode

DOES_NOT_FIT = re.compile(
    r"does not fit: peak (\d+) MB( \(the highest of \d ranks\))? over the (\d+) MB budget on "
    r"the longest batch \((\d+) tokens\)"
)


class Run:
    """A finished trainer: its exit code, its stderr and the events it sent."""

    def __init__(self, returncode: int, stderr: str, events: list[TrainerEvent]):
        self.returncode = returncode
        self.stderr = stderr
        self.events = events

    def of(self, kind: str) -> list[TrainerEvent]:
        return [e for e in self.events if e.kind == kind]


def watched(argv: list[str], folder: Path, endpoint: str) -> Run:
    """Run ``argv`` (a trainer, or mlx.launch of trainers) to its end, collecting events."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    stderr_path = folder / f"stderr-{len(list(folder.glob('stderr-*')))}"
    events: list[TrainerEvent] = []

    def receive() -> None:
        message = decode(router.recv_multipart()[-1])
        if isinstance(message, TrainerEvent):
            events.append(message)

    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            argv,
            env=trainer_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:

            def ended() -> bool:
                while router.poll(50):
                    receive()
                return proc.poll() is not None

            wait_for(ended, 240, interval=0)
            while router.poll(300):  # what the trainer flushed as it exited
                receive()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            router.close()
    return Run(proc.returncode, stderr_path.read_text(), events)


def run_watched(config: Path, *extra: str) -> Run:
    folder = config.parent
    endpoint = f"ipc://{folder}/telemetry"
    return watched(trainer_command(config, "--telemetry", endpoint, *extra), folder, endpoint)


def text_data(folder: Path, word_counts: list[int], source: Path, valid: int = 4) -> Path:
    """A text data folder: one sample per entry of ``word_counts``, cut from the tiny
    preset's own training text; the validation samples are short."""
    lines = source.read_text().splitlines()
    words = " ".join(json.loads(line)["text"] for line in lines).split()
    folder.mkdir(parents=True)

    def samples(counts: list[int]) -> str:
        out = []
        for number, count in enumerate(counts):
            begin = (number * 37) % (len(words) - count)
            out.append(json.dumps({"text": " ".join(words[begin : begin + count])}) + "\n")
        return "".join(out)

    (folder / "train.jsonl").write_text(samples(word_counts))
    (folder / "valid.jsonl").write_text(samples([12] * valid))
    return folder


def train_lengths(workspace: Path, config: Path) -> TokenizedDataset:
    """The training set as the trainer tokenizes it."""
    from mlx_lm import load

    from loractl.config import load_config
    from loractl.daemon.data import load_datasets

    _, tokenizer = load(str(workspace / "model"))
    return load_datasets(load_config(config), tokenizer).train


def brute_force_longest(dataset, order, start, total, batch_size, max_seq_length) -> int:
    """The most tokens of any batch the loop would build from ``start`` on, by building each."""
    most = 0
    position = start
    while position < total:
        rows = min(batch_size, total - position)
        batch, _ = make_batch(dataset, order.indices(position, rows), max_seq_length)
        most = max(most, batch.shape[0] * batch.shape[1])
        position += rows
    return most


# --- the choice of batch, without a model ---------------------------------------------------


def test_longest_batch_is_the_one_make_batch_pads_largest_from_any_start():
    """From any resume point, at any rung batch size, the chosen batch has the most tokens."""
    rng = np.random.default_rng(5)
    lengths = rng.integers(2, 700, size=61)
    dataset = TokenizedDataset([(np.arange(n, dtype=np.int32), 0) for n in lengths])
    for order_batch, batch_size, max_seq, begin, total in [
        (4, 4, 512, 0, 240),
        (4, 2, 512, 6, 240),
        (4, 1, 128, 37, 100),
        (4, 3, 2048, 5, 200),
        (1, 1, 300, 59, 61),
    ]:
        order = ExampleOrder(lengths, order_batch, seed=11)
        choice = longest_train_batch(order, lengths, begin, total, batch_size, max_seq)
        expected = brute_force_longest(dataset, order, begin, total, batch_size, max_seq)
        assert choice is not None and choice.tokens == expected
        batch, _ = make_batch(dataset, choice.indices, max_seq)
        assert (choice.rows, choice.width) == batch.shape
        assert choice.indices == order.indices(choice.start, choice.rows)
        assert begin <= choice.start < total and (choice.start - begin) % batch_size == 0
    assert longest_train_batch(order, lengths, 61, 61, 1, 300) is None


def test_longest_eval_batch_is_among_the_batches_evaluation_runs():
    """Only the first val_batches validation batches count, as evaluation runs only those."""
    from loractl.daemon.data import eval_batches

    lengths = np.random.default_rng(2).integers(2, 400, size=30)
    dataset = TokenizedDataset([(np.arange(n, dtype=np.int32), 0) for n in lengths])
    for num_batches in (1, 3, -1):
        choice = longest_eval_batch(dataset, 4, num_batches, 256, seed=3)
        sizes = [b.shape[0] * b.shape[1] for b, _ in eval_batches(dataset, 4, num_batches, 256, 3)]
        assert choice is not None and choice.tokens == max(sizes)
    assert longest_eval_batch(dataset, 4, 0, 256, seed=3) is None
    assert longest_eval_batch(None, 4, 2, 256, seed=3) is None


def test_default_budget_is_the_supervisors(tmp_path, monkeypatch):
    """Without --budget-mb the trainer holds itself to the budget the supervisor would set,
    a cgroup limit included."""
    from loractl.config import parse_config
    from loractl.supervisor.jobview import budget_mb

    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    plain = parse_config({"model": "model", "data": "data"}, tmp_path)
    budgeted = parse_config({"model": "model", "data": "data", "memory_budget_mb": 3000}, tmp_path)
    for cfg in (plain, budgeted):
        assert default_budget_mb(cfg) == pytest.approx(budget_mb(cfg))
    assert default_budget_mb(budgeted) == 3000
    monkeypatch.setattr("loractl.memory.cgroup_memory_limit_mb", lambda: 1000.0)
    assert default_budget_mb(plain) == pytest.approx(budget_mb(plain)) == 700


def test_an_allocation_failure_in_the_preflight_is_a_verdict_not_a_crash():
    """Out of memory inside the pre-flight says "does not fit"; a buffer-count error is raised."""
    dataset = TokenizedDataset([(np.arange(40, dtype=np.int32), 0) for _ in range(4)])
    order = ExampleOrder(dataset.lengths, 1, seed=0)

    def failing(message):
        def loss(model, batch, lengths):
            raise RuntimeError(message)

        return loss

    common = {
        "order": order,
        "start": 0,
        "total": 4,
        "batch_size": 1,
        "max_seq_length": 128,
        "val_batches": 0,
        "seed": 0,
        "budget_mb": 1e6,
        "weights": 0.0,
    }
    result = run_preflight(
        nn.Linear(2, 2), dataset, None, **common, loss=failing(FaultInjector.MESSAGE)
    )
    assert not result.fits and "ran out of memory" in result.summary()
    assert result.does_not_fit_words().startswith(
        "does not fit: out of memory on the longest batch (65 tokens) with a 1000000 MB budget"
    )
    with pytest.raises(RuntimeError, match="Resource limit"):
        run_preflight(
            nn.Linear(2, 2),
            dataset,
            None,
            **common,
            loss=failing(FaultInjector.RESOURCE_LIMIT_MESSAGE),
        )


# --- the real trainer ------------------------------------------------------------------------


def test_preflight_event_reports_the_longest_batch(tiny_workspace, tmp_path):
    """The event names the longest batch's tokens and a peak above the weights, before step 1."""
    counts = [int(c) for c in np.random.default_rng(1).integers(4, 90, size=24)]
    data = text_data(tmp_path / "data", counts, tiny_workspace / "data" / "train.jsonl")
    job = {"batch_size": 2, "iters": 12, "max_seq_length": 128, "val_batches": 2}
    config = make_job(tiny_workspace, tmp_path / "job", data=str(data), **job)
    run = run_watched(config, "--fresh", "--budget-mb", "100000")
    assert run.returncode == 0, run.stderr

    train = train_lengths(tiny_workspace, config)
    order = ExampleOrder(train.lengths, 2, seed=0)
    expected = brute_force_longest(train, order, 0, 24, 2, 128)
    (event,) = run.of("preflight")
    detail = event.detail
    assert event.step == 0 and event.examples_seen == 0
    assert detail["tokens"] == expected
    assert detail["batch_size"] == 2 and detail["max_seq_length"] == 128
    assert detail["budget_mb"] == 100000
    assert 0 < detail["weights_mb"] < detail["mlx_peak_mb"] <= detail["peak_mb"]
    assert detail["peak_mb"] == max(detail["mlx_peak_mb"], detail["footprint_mb"])
    assert 0 < detail["eval_peak_mb"] <= detail["peak_mb"]
    # Reported before anything trained: the first event of the attempt after the loading
    # progress ("loading" events say which stage the load reached).
    assert [e.kind for e in run.events if e.kind != "loading"][0] == "preflight"
    assert f"= {expected} tokens peaked at" in run.stderr


@pytest.mark.parametrize(
    ("budget", "code"), [("100000", ExitCode.STOPPED), ("1", ExitCode.DOES_NOT_FIT)]
)
def test_a_stop_during_the_preflight_waits_for_its_reading(tiny_workspace, tmp_path, budget, code):
    """A SIGTERM (the guard's) in the pre-flight still sends its reading, then ends the attempt:
    stopped before training if it fit, "does not fit" if it did not; nothing trained."""
    config = make_job(tiny_workspace, tmp_path, iters=8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORACTL_FAULT_STOP_IN_PREFLIGHT", "1")
        run = run_watched(config, "--fresh", "--budget-mb", budget)
    assert run.returncode == code, run.stderr
    (event,) = run.of("preflight")
    assert event.detail["peak_mb"] > event.detail["weights_mb"] > 0
    assert event.detail["fits"] is (code == ExitCode.STOPPED)
    assert run.of("checkpoint") == [] and run.of("done") == []
    if code == ExitCode.STOPPED:
        (stopped,) = run.of("stopped")
        assert stopped.detail["before_training"] is True and stopped.step == 0


def test_preflight_false_skips_it(tiny_workspace, tmp_path):
    """With preflight: false no pre-flight runs, even under a budget nothing fits in."""
    config = make_job(tiny_workspace, tmp_path, iters=4, preflight=False)
    run = run_watched(config, "--fresh", "--budget-mb", "1")
    assert run.returncode == 0, run.stderr
    assert run.of("preflight") == [] and run.of("done")
    assert "pre-flight" not in run.stderr


@pytest.fixture(scope="module")
def late_long(tiny_workspace, tmp_path_factory):
    """Short samples and one long one that the data order brings late: (config, position)."""
    root = tmp_path_factory.mktemp("late-long")
    counts = [12] * 23 + [600]  # an even count: batches of 2 leave none out
    data = text_data(root / "data", counts, tiny_workspace / "data" / "train.jsonl")
    job = {
        "batch_size": 1,
        "grad_accumulation_steps": 1,
        "iters": len(counts),
        "max_seq_length": 4096,
        "checkpoint_every": 1,
        "val_batches": 2,
    }
    config = make_job(tiny_workspace, root / "probe", data=str(data), **job)
    lengths = train_lengths(tiny_workspace, config).lengths
    longest = int(np.argmax(lengths))
    assert lengths[longest] > 4 * np.sort(lengths)[-2]

    def position(seed: int) -> int:
        return ExampleOrder(lengths, 1, seed).permutation(0).tolist().index(longest)

    seed = max(range(40), key=position)
    assert position(seed) >= 0.75 * len(counts)
    return data, {**job, "seed": seed}, position(seed)


def test_late_long_example_stops_before_the_first_step(tiny_workspace, tmp_path, late_long):
    """A budget between the typical and the longest batch's peaks stops the attempt at step 0,
    though the long example comes only near the end of the run."""
    data, job, late = late_long

    def attempt(name: str, budget: float, **changes) -> Run:
        config = make_job(tiny_workspace, tmp_path / name, data=str(data), **{**job, **changes})
        return run_watched(config, "--fresh", "--budget-mb", str(budget))

    # Measured first, each at a budget nothing fits in: the run cut short of the long example
    # peaks at the typical batch's, the whole run at the long example's.
    typical = attempt("typical", 1, iters=late).of("preflight")[0].detail
    longest = attempt("longest", 1).of("preflight")[0].detail
    assert longest["tokens"] > 4 * typical["tokens"]
    assert longest["position"] == late
    gap = longest["peak_mb"] - typical["peak_mb"]
    assert gap > 40, (typical, longest)
    budget = round(typical["peak_mb"] + gap / 2)

    stopped = attempt("stopped", budget)
    assert stopped.returncode == ExitCode.DOES_NOT_FIT, stopped.stderr
    found = DOES_NOT_FIT.search(stopped.stderr)
    assert found, stopped.stderr
    assert int(found.group(3)) == budget and int(found.group(4)) == longest["tokens"]
    assert int(found.group(1)) > budget
    (error,) = stopped.of("error")
    assert error.detail["exit_code"] == ExitCode.DOES_NOT_FIT and error.step == 0
    assert logged_steps(tmp_path / "stopped") == []
    adapters = tmp_path / "stopped" / "adapters"
    assert not (adapters / "checkpoints").exists() or not any((adapters / "checkpoints").iterdir())
    assert not (adapters / "adapters.safetensors").exists()

    # The same budget holds every batch before the long one: cut short of it, the run trains.
    fits = attempt("fits", budget, iters=late)
    assert fits.returncode == 0, fits.stderr
    assert fits.of("preflight")[0].detail["fits"] and max(logged_steps(tmp_path / "fits")) == late


def test_ranks_agree_on_the_verdict(tiny_workspace, tmp_path, late_long):
    """Two ranks each run their share; when only rank 1's share is over, both exit 83."""
    from loractl.config import load_config
    from loractl.distributed import free_port_range, launch_command

    data, job, _late = late_long
    two = {
        **job,
        "batch_size": 2,
        "iters": 12,
        "distributed": {"backend": "ring", "processes": 2},
    }

    def launch(name: str, budget: float) -> Run:
        config = make_job(tiny_workspace, tmp_path / name, data=str(data), **two)
        endpoint = f"ipc://{config.parent}/telemetry"
        argv = launch_command(
            load_config(config).distributed,
            trainer_command(config, "--fresh", "--telemetry", endpoint, "--budget-mb", budget),
            starting_port=free_port_range(2),
        )
        return watched(argv, config.parent, endpoint)

    measured = {e.rank: e.detail for e in launch("measure", "1").of("preflight")}
    assert sorted(measured) == [0, 1]
    # The longest global batch pairs the long sample with the next longest; rank 1 has it.
    assert measured[1]["tokens"] > 4 * measured[0]["tokens"]
    budget = round((measured[0]["peak_mb"] + measured[1]["peak_mb"]) / 2)
    run = launch("verdict", str(budget))
    verdicts = {e.rank: e.detail for e in run.of("preflight")}
    assert verdicts[0]["peak_mb"] < budget < verdicts[1]["peak_mb"]
    assert not verdicts[0]["fits"] and not verdicts[1]["fits"]
    errors = run.of("error")
    assert sorted(e.rank for e in errors) == [0, 1]
    assert {e.detail["exit_code"] for e in errors} == {ExitCode.DOES_NOT_FIT}
    for error in errors:  # each names the highest rank's peak and tokens, not its own
        assert "(the highest of 2 ranks)" in error.detail["reason"]
        assert f"({verdicts[1]['tokens']} tokens)" in error.detail["reason"]


# --- exactness -------------------------------------------------------------------------------


def test_sigkill_and_resume_with_preflight_is_bitwise_equal_to_a_run_without(
    tiny_workspace, tmp_path
):
    """Pre-flights on (fresh and resumed, dropout on), SIGKILL mid-run: the final adapter is
    bitwise equal to an uninterrupted run's without any pre-flight."""
    plain = make_job(tiny_workspace, tmp_path / "plain", **JOB, preflight=False)
    result = run_trainer(plain, "--fresh")
    assert result.returncode == 0, result.stderr
    assert "pre-flight" not in result.stderr

    config = make_job(tiny_workspace, tmp_path / "killed", **JOB)
    proc = start(config, "--fresh")
    kill_at_step(proc, tmp_path / "killed", random.Random().randrange(3, 57))
    assert proc.returncode == -signal.SIGKILL
    result = run_trainer(config)
    assert result.returncode == 0, result.stderr
    assert "resumed from step-" in result.stderr and "pre-flight: longest batch" in result.stderr
    assert adapter_digest(tmp_path / "killed") == adapter_digest(tmp_path / "plain")


def test_rung_change_with_preflight_is_bitwise_equal_to_a_run_without(
    tiny_workspace,
    varlen_data,  # noqa: F811
    tmp_path,
):
    """A memory stop, a max_seq_length rung, a SIGKILL and a resume, each attempt with its
    pre-flight: bitwise equal to the same stop and rung without any."""
    to_seq_256 = json.dumps({"max_seq_length": 256})

    def stepped(folder: Path, preflight: bool) -> list[str]:
        config = make_job(
            tiny_workspace, folder, data=str(varlen_data), **VARLEN_JOB, preflight=preflight
        )
        first = run_trainer(config, "--fresh", env=trainer_env(LORACTL_FAULT_OOM="5:2"))
        assert first.returncode == ExitCode.OUT_OF_MEMORY, first.stderr
        outputs = [first.stderr]
        if preflight:
            proc = start(config, "--overrides", to_seq_256, "--rung", "1")
            kill_at_step(proc, folder, 8)
        result = run_trainer(config, "--overrides", to_seq_256, "--rung", "1")
        assert result.returncode == 0, result.stderr
        return [*outputs, result.stderr]

    stepped(tmp_path / "reference", preflight=False)
    first, last = stepped(tmp_path / "checked", preflight=True)
    assert "pre-flight: longest batch" in first
    # The resumed attempt on the rung measured its own longest batch, at its own length.
    assert re.search(r"pre-flight: longest batch 4\u00d7(\d+)", last).group(1) == "256"
    assert adapter_digest(tmp_path / "checked") == adapter_digest(tmp_path / "reference")


def test_preflight_leaves_the_model_and_the_global_rngs_as_they_were():
    """Parameters, train/eval mode, numpy's and Python's RNGs are the same after it."""
    import random as pyrandom

    from mlx.utils import tree_flatten

    model = nn.Sequential(nn.Embedding(64, 8), nn.Dropout(0.5), nn.Linear(8, 64))
    model.eval()
    dataset = TokenizedDataset(
        [(np.arange(n, dtype=np.int32) % 64, 0) for n in (5, 9, 30, 12, 7, 3)]
    )

    def loss(model, batch, lengths):
        logits = model(batch[:, :-1])
        return nn.losses.cross_entropy(logits, batch[:, 1:]).mean(), mx.array(batch.size)

    before = [(k, np.array(v)) for k, v in tree_flatten(model.parameters())]
    np.random.seed(3)
    pyrandom.seed(3)
    numpy_next, python_next = np.random.random(), pyrandom.random()
    np.random.seed(3)
    pyrandom.seed(3)
    result = run_preflight(
        model,
        dataset,
        dataset,
        order=ExampleOrder(dataset.lengths, 2, seed=0),
        start=0,
        total=6,
        batch_size=2,
        max_seq_length=64,
        val_batches=-1,
        seed=0,
        budget_mb=1e6,
        weights=0.0,
        loss=loss,
    )
    # Every batch pads to 33 (1 + a multiple of 32): the first of them is the longest.
    assert result.fits and (result.rows, result.width) == (2, 33)
    assert result.evaluation is not None
    assert not model.training
    assert np.random.random() == numpy_next and pyrandom.random() == python_next
    after = tree_flatten(model.parameters())
    assert all(np.array_equal(a, np.array(b)) for (_, a), (_, b) in zip(before, after, strict=True))
