"""A job's memory model: predict each rung's peak from the peaks measured so far, and plan a
step down that skips the rungs that will not help. Pure: no processes, no store, no clock, no
mlx; the supervisor feeds it readings and asks it questions.

The model
---------
For a rung's settings (a :class:`RungShape`) the peak is predicted as::

    peak = fixed + a * tokens * layers / (g if grad_checkpoint else 1) + b * rank * layers

- ``fixed``: the weights and everything else that no ladder setting moves (the Python
  process, the tokenizer, the frozen layers). The trainer measures it right after loading the
  model (``Measurement.fixed_mb``). That reading anchors it: with readings on one shape it is
  the fixed part; readings on two or more token counts identify the intercept themselves, and
  then they win (a fixed reading taken with another meter than the peaks, MLX's active
  memory against the process footprint, would otherwise push the difference into the LoRA
  term). Without a fixed reading the fixed part is fitted like the rest.
- ``a``: activation memory per token of a micro-batch (``batch_size * max_seq_length``) per
  layer trained with LoRA, since backpropagation keeps the trained layers' activations.
- ``g``: how much gradient checkpointing divides the activation part. It is fitted as a
  separate, non-negative activation coefficient for the checkpointed case (``a / g``), so it
  is learnt when a job has readings with and without checkpointing and comes from the prior
  otherwise.
- ``b``: the LoRA parameters, their gradients and the two Adam moments, per rank per trained
  layer.

The coefficients are fitted by least squares on this job's readings (relative errors, so a
large and a small rung count alike), constrained non-negative, and pulled weakly towards a
prior that settles what the readings cannot tell apart (see :class:`Prior`): with one reading,
the split between the fixed part, activations and LoRA is the prior's; with readings at two
token counts, the fixed part and ``a`` are the readings' and ``b`` keeps the prior's ratio to
``a`` until readings on two ranks measure it; ``g`` likewise needs readings with and without
checkpointing. Non-negative coefficients make every prediction monotone: fewer tokens, fewer
layers, a lower rank or gradient checkpointing never predict more memory.

What it assumes, and where it breaks
------------------------------------
- Activation memory is linear in the tokens of one micro-batch and in the number of trained
  layers. Attention that materialises its score matrix (MLX's fused attention does not in the
  forward pass, its backward may) adds a term in ``seq**2`` per layer; the linear model then
  overstates what a shorter sequence saves a little: fitted on seq 512 and 256, it predicts
  seq 128 about 2% low on the DESIGN.md table.
- The longest batch sets the peak, and every batch is counted at ``batch_size *
  max_seq_length`` tokens. Data shorter than ``max_seq_length`` peaks lower; then the model
  overstates the peak (safe). mlx-lm pads a batch to its longest example (to 1 + a multiple of
  32, at most max_seq_length), so one long example makes the whole batch long.
- Peaks grow linearly in the batch size. On the DESIGN.md table batch 2 peaked well under twice
  batch 1's activations, so a batch-size rung is predicted to save more than it will, and a
  larger batch is predicted higher than it will be (28% high for the table's batch-2 row,
  predicted from two batch-1 rows).
- Gradient accumulation does not change the peak (DESIGN.md measured 0%): gradients are summed
  into one buffer of the LoRA parameters' size, which is the ``b`` term.
- The LoRA term assumes mlx-lm's default adapted projections; another ``lora_parameters.keys``
  list changes ``b``, which the readings then learn if the rank changes between them.
- MLX's buffer cache is not modelled apart: a reading that includes cache growth (the process
  footprint does, ``mx.get_peak_memory`` does not) counts it as part of the peak, and the model
  learns whatever the readings report. Keep to one meter per job, the fixed reading too.
- A distributed job is modelled per process: each rank holds ``batch_size / world_size``
  examples of a batch, and the budget is a per-process budget.
- ``num_layers: -1`` (all layers) needs the model's depth, which the config does not hold:
  :meth:`RungShape.of` takes it as ``model_layers``, else assumes :data:`ALL_LAYERS_GUESS`.
  That guess matters only when a rung sets ``num_layers`` explicitly, or for the prior's split
  between the fixed and the activation parts when there is no fixed reading.
- Full fine-tunes (``fine_tune_type: full``) have no rank; their weights' gradients and
  optimizer state sit in ``fixed``, which the ladder cannot move.
- Every reading is a lower bound of its shape's true peak (a reading never over-reads), so a
  prediction for a shape already measured is never below that shape's highest reading.
- A guard reading, taken when the guard stopped the trainer, is a lower bound only. On a shape
  with a preflight or running reading it can only raise that shape's peak; on a shape of its
  own it is left out of the fit while the fit predicts that shape at or above it, and joins
  the fit as a reading once the fit falls below it (a least-squares pull, not a hard
  constraint; the shape's own prediction is floored at the reading either way). A job with
  guard readings only is fitted to them as they are, so its predictions are low if anything.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from loractl.config import JobConfig
from loractl.supervisor.ladder import effective_config, rung_count

__all__ = [
    "ALL_LAYERS_GUESS",
    "DEFAULT_PRIOR",
    "KINDS",
    "Coefficients",
    "Measurement",
    "MemoryModel",
    "Prior",
    "RungShape",
    "Skip",
    "StepPlan",
    "ladder_predictions",
    "ladder_shapes",
    "plan_step_down",
]

# The depth assumed for ``num_layers: -1`` when the model's is not known: Mistral-7B's and
# Llama-2-7B's 32 layers, the models this tool is most often used with.
ALL_LAYERS_GUESS = 32

# preflight: the trainer's forward and backward of the attempt's longest batch (and its
# largest validation batch) before its first step; running: a peak reported while training;
# guard: the reading the memory guard acted on when it stopped the trainer (a lower bound).
KINDS = ("preflight", "running", "guard")


@dataclass(frozen=True)
class RungShape:
    """The settings of one rung that move its memory.

    ``batch_size`` is the examples one process holds per micro-batch (a distributed job's
    ranks each take ``batch_size / world_size``); ``num_layers`` the layers trained with LoRA,
    resolved to a count; ``rank`` 0 for a full fine-tune.
    """

    batch_size: int
    max_seq_length: int
    num_layers: int
    rank: int
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_seq_length", "num_layers", "grad_accumulation_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RungShape.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ValueError(f"RungShape.rank must be an integer >= 0, got {self.rank!r}")

    @classmethod
    def of(cls, cfg: JobConfig, model_layers: int | None = None) -> RungShape:
        """The shape of an effective config (``effective_config(cfg, rung)`` for a rung).

        ``model_layers`` is the model's depth, which resolves ``num_layers: -1`` and caps a
        larger count (mlx-lm trains at most every layer); without it -1 means
        :data:`ALL_LAYERS_GUESS`.
        """
        depth = model_layers if model_layers and model_layers > 0 else None
        layers = cfg.num_layers
        if layers < 1:
            layers = depth or ALL_LAYERS_GUESS
        elif depth is not None:
            layers = min(layers, depth)
        world = max(1, cfg.world_size)
        return cls(
            batch_size=max(1, cfg.batch_size // world),
            max_seq_length=cfg.max_seq_length,
            num_layers=layers,
            rank=0 if cfg.fine_tune_type == "full" else cfg.lora_parameters.rank,
            grad_checkpoint=bool(cfg.grad_checkpoint),
            grad_accumulation_steps=cfg.grad_accumulation_steps,
        )

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch; accumulation does not change the peak (DESIGN: 0%)."""
        return self.batch_size * self.max_seq_length

    def describe(self) -> str:
        return (
            f"batch {self.batch_size}, seq {self.max_seq_length}, {self.num_layers} layers,"
            f" rank {self.rank}, accumulation {self.grad_accumulation_steps}"
            + (", grad checkpointing" if self.grad_checkpoint else "")
        )


def ladder_shapes(cfg: JobConfig, model_layers: int | None = None) -> list[RungShape]:
    """Every rung's shape, rung 0 first."""
    return [
        RungShape.of(effective_config(cfg, rung), model_layers) for rung in range(rung_count(cfg))
    ]


def _finite(value: object, minimum: float, name: str, *, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < minimum or (strict and number == minimum):
        bound = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {bound} {minimum:g}, got {value!r}")
    return number


@dataclass(frozen=True)
class Measurement:
    """One peak measured on one shape, in MB.

    ``kind`` is one of :data:`KINDS`; ``fixed_mb`` the footprint the trainer measured right
    after loading the model (the weights), when it reported one.
    """

    shape: RungShape
    peak_mb: float
    kind: str = "preflight"
    fixed_mb: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.shape, RungShape):
            raise ValueError(f"Measurement.shape must be a RungShape, got {self.shape!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Measurement.kind must be one of {KINDS}, got {self.kind!r}")
        _finite(self.peak_mb, 0.0, "Measurement.peak_mb", strict=True)
        if self.fixed_mb is not None:
            _finite(self.fixed_mb, 0.0, "Measurement.fixed_mb", strict=False)


@dataclass(frozen=True)
class Prior:
    """What a job's coefficients are assumed to be before its readings say otherwise.

    The defaults are fitted to DESIGN.md's measured table (a Mistral-7B-shaped 4-bit model, 16
    LoRA layers, mlx-lm's trainer, MLX 0.32.4), in MB:

    - ``lora_mb`` = 1.28 per rank per layer: rank 8 -> 4 at seq 128 saved 0.08 GB over 16
      layers. It is also what first principles give: mlx-lm adapts every linear projection of
      a block by default, which for Mistral-7B is sum(d_in + d_out) = 81,920 parameters per
      rank per layer, each held in float32 four times (weight, gradient, two Adam moments):
      81,920 * 16 bytes = 1.31 MB.
    - ``activation_mb`` = 0.86 per token per layer: the seq 128 -> 256 -> 512 rows at rank 8,
      fitted by least squares with ``lora_mb`` held at 1.28.
    - ``fixed_mb`` = 3,990: the intercept of that fit, about the 4-bit weights (3.8-4.1 GB
      for a 7B model at group size 64) plus the process.
    - ``gc_divisor`` = 1.14: gradient checkpointing at seq 512 saved 0.85 GB of the fitted
      7.0 GB activation part (10.98 -> 10.13 GB, the ~8% DESIGN.md reports).

    The prior is rescaled to each job's own readings before it is used (its fixed part to the
    job's fixed reading when there is one, the rest by the median ratio of reading to prior
    prediction), so what carries over from the 7B model is its proportions, not its size:

    - the split of the variable part between activations and LoRA (``lora_mb / activation_mb``
      = 1.5 tokens per rank). Both scale with the hidden size (activations per token per
      layer, and LoRA's d_in + d_out), so the ratio holds across model sizes far better than
      either figure does. With a single reading one cannot separate ``a`` from ``b``; the ratio
      decides, and since the LoRA part is a few percent of the peak, an error in it moves a
      prediction by as little.
    - the gradient-checkpointing divisor.
    - the share of the fixed part (about 36% of the peak at seq 512, 52% at seq 256), used only
      when no reading of the weights came with the measurements and the readings have too few
      shapes to separate the fixed part from the activations. That share is the 7B model's and
      is the prior's weakest part for other sizes; the trainer's ``fixed_mb`` replaces it.

    ``weight`` is how much the prior counts against the readings: each coefficient's squared
    relative deviation from it is weighed against the readings' squared relative errors. At
    1e-6 a coefficient 4 times off its prior costs what a 0.3% misfit does, so the readings
    decide whatever they identify, and the prior settles only what they leave open. (The fixed
    part's pull is a further 1000 times weaker: it takes whatever intercept the readings show.)
    """

    fixed_mb: float = 3990.0
    activation_mb: float = 0.86
    lora_mb: float = 1.28
    gc_divisor: float = 1.14
    weight: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("fixed_mb", "activation_mb", "lora_mb", "weight"):
            _finite(getattr(self, name), 0.0, f"Prior.{name}", strict=True)
        # Strictly above 1: the fit learns checkpointing's saving relative to the prior's, so
        # a prior of no saving at all could never learn one.
        _finite(self.gc_divisor, 1.0, "Prior.gc_divisor", strict=True)


DEFAULT_PRIOR = Prior()


@dataclass(frozen=True)
class Coefficients:
    """A fitted model: ``peak = fixed_mb + activation_mb * tokens * layers / (gc_divisor if
    grad_checkpoint else 1) + lora_mb * rank * layers``, all in MB.

    ``fixed_measured`` says whether a fixed reading anchored ``fixed_mb`` (else it is fitted
    from the prior's share); ``shapes`` and ``readings`` count what the fit saw.
    ``gc_divisor`` is infinite when the readings put all activation memory in what
    checkpointing frees.
    """

    fixed_mb: float
    activation_mb: float
    lora_mb: float
    gc_divisor: float
    fixed_measured: bool
    shapes: int
    readings: int

    def predict(self, shape: RungShape) -> float:
        activation = self.activation_mb * shape.tokens * shape.num_layers
        if shape.grad_checkpoint:
            activation = activation / self.gc_divisor if math.isfinite(self.gc_divisor) else 0.0
        return self.fixed_mb + activation + self.lora_mb * shape.rank * shape.num_layers


# The fit's unknowns, in order: fixed, activation with checkpointing (a / g), the extra
# activation without it (a - a / g), LoRA. Each is >= 0, which keeps predictions monotone.
def _features(shape: RungShape) -> tuple[float, float, float, float]:
    token_layers = float(shape.tokens * shape.num_layers)
    return (
        1.0,
        token_layers,
        0.0 if shape.grad_checkpoint else token_layers,
        float(shape.rank * shape.num_layers),
    )


# How much weaker the pull on the fixed part is than on the others: the fixed part is where
# what no setting moves lands (the Python process, a fixed reading taken with another meter
# than the peaks), so when the readings identify an intercept the fixed part takes it, and the
# LoRA term keeps the prior's proportion until readings on two ranks say otherwise.
_FIXED_PULL = 1e-3


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(rhs)
    rows = [[*matrix[i], rhs[i]] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        if abs(rows[pivot][col]) < 1e-12:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(col + 1, n):
            factor = rows[r][col] / rows[col][col]
            for c in range(col, n + 1):
                rows[r][c] -= factor * rows[col][c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        tail = sum(rows[r][c] * out[c] for c in range(r + 1, n))
        out[r] = (rows[r][n] - tail) / rows[r][r]
    return out


def _nnls(rows: list[list[float]], targets: list[float]) -> list[float]:
    """min ||rows @ u - targets||^2 subject to u >= 0, for a handful of unknowns.

    Exact by enumeration: the optimum is the unconstrained least-squares solution on its own
    support, so the best feasible solution over every support is the optimum. The caller's
    prior rows make every normal matrix non-singular.
    """
    n = len(rows[0])
    best: list[float] = [0.0] * n
    best_cost = sum(t * t for t in targets)
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            normal = [[sum(row[i] * row[j] for row in rows) for j in support] for i in support]
            rhs = [sum(row[i] * t for row, t in zip(rows, targets, strict=True)) for i in support]
            solution = _solve(normal, rhs)
            if solution is None or min(solution) < -1e-12:
                continue
            u = [0.0] * n
            for index, value in zip(support, solution, strict=True):
                u[index] = max(0.0, value)
            cost = sum(
                (sum(a * b for a, b in zip(row, u, strict=True)) - t) ** 2
                for row, t in zip(rows, targets, strict=True)
            )
            if cost < best_cost - 1e-15:
                best, best_cost = u, cost
    return best


class MemoryModel:
    """A job's fitted memory model; build it with :meth:`fit`."""

    def __init__(
        self,
        coefficients: Coefficients | None,
        floors: dict[RungShape, float],
        prior: Prior = DEFAULT_PRIOR,
    ) -> None:
        self.coefficients = coefficients
        self.prior = prior
        # The highest reading of each measured shape: its true peak is at least that.
        self._floors = dict(floors)

    @classmethod
    def fit(cls, measurements: Iterable[Measurement], prior: Prior = DEFAULT_PRIOR) -> MemoryModel:
        """Fit this job's coefficients to its readings (see the module docstring)."""
        readings = list(measurements)
        if not readings:
            return cls(None, {}, prior)
        exact: dict[RungShape, float] = {}
        guard: dict[RungShape, float] = {}
        for m in readings:
            bucket = guard if m.kind == "guard" else exact
            bucket[m.shape] = max(bucket.get(m.shape, 0.0), m.peak_mb)
        floors = {s: max(exact.get(s, 0.0), guard.get(s, 0.0)) for s in {*exact, *guard}}
        # A guard reading above a proper reading of the same shape raises it (the true peak
        # is at least both); a guard reading alone is a lower bound, used below.
        equalities = {s: floors[s] for s in exact}
        bounds = {s: v for s, v in guard.items() if s not in exact}
        if not equalities:
            equalities, bounds = dict(bounds), {}

        fixed_readings = [m.fixed_mb for m in readings if m.fixed_mb is not None]
        fixed: float | None = None
        if fixed_readings:
            # The highest reading (it can only have missed memory), capped by the lowest
            # peak: a peak includes the weights.
            fixed = min(max(fixed_readings), min(floors.values()))

        coefficients = _fit(equalities, fixed, prior)
        # Lower bounds the fit violates become equalities, until none is violated.
        while True:
            violated = {s: v for s, v in bounds.items() if coefficients.predict(s) < v * (1 - 1e-9)}
            if not violated:
                break
            equalities.update(violated)
            for s in violated:
                del bounds[s]
            coefficients = _fit(equalities, fixed, prior)
        coefficients = Coefficients(
            fixed_mb=coefficients.fixed_mb,
            activation_mb=coefficients.activation_mb,
            lora_mb=coefficients.lora_mb,
            gc_divisor=coefficients.gc_divisor,
            fixed_measured=fixed is not None,
            shapes=len(floors),
            readings=len(readings),
        )
        return cls(coefficients, floors, prior)

    @property
    def measured(self) -> bool:
        """Whether the model has seen any reading (predictions are None until it has)."""
        return self.coefficients is not None

    def predict(self, shape: RungShape, *, readings: bool = True) -> float | None:
        """The predicted peak in MB, None before any reading.

        With ``readings`` (the default) a shape already measured is never predicted below its
        highest reading; without, it is the formula alone.
        """
        if self.coefficients is None:
            return None
        value = self.coefficients.predict(shape)
        if readings:
            value = max(value, self._floors.get(shape, 0.0))
        return value


def _fit(points: dict[RungShape, float], fixed: float | None, prior: Prior) -> Coefficients:
    """Least squares in relative error over ``points`` (shape -> peak), coefficients >= 0,
    ridge towards the prior rescaled to these points."""
    base = (
        prior.fixed_mb,
        prior.activation_mb / prior.gc_divisor,
        prior.activation_mb - prior.activation_mb / prior.gc_divisor,
        prior.lora_mb,
    )
    shapes = list(points)
    feats = [_features(s) for s in shapes]
    if fixed is None:
        ratios = [
            points[s] / sum(b * f for b, f in zip(base, x, strict=True))
            for s, x in zip(shapes, feats, strict=True)
        ]
        scale = statistics.median(ratios)
        centre = [b * scale for b in base]
    else:
        ratios = [
            max(points[s] - fixed, 0.0) / sum(b * f for b, f in zip(base[1:], x[1:], strict=True))
            for s, x in zip(shapes, feats, strict=True)
        ]
        # Peaks all at the fixed reading still leave a small positive scale, so that the
        # activation terms stay in the fit; a zero reading a small positive fixed part.
        scale = max(statistics.median(ratios), 1e-6)
        centre = [max(fixed, 1.0)] + [b * scale for b in base[1:]]
    # Unknowns u_j = coefficient_j / centre_j >= 0; rows scaled by 1/peak (relative errors);
    # one ridge row per unknown pulls it towards 1, the prior (or the fixed reading).
    rows: list[list[float]] = []
    targets: list[float] = []
    for s, x in zip(shapes, feats, strict=True):
        rows.append([c * f / points[s] for c, f in zip(centre, x, strict=True)])
        targets.append(1.0)
    for k in range(len(centre)):
        root = math.sqrt(prior.weight * (_FIXED_PULL if k == 0 else 1.0))
        rows.append([root if i == k else 0.0 for i in range(len(centre))])
        targets.append(root)
    fixed_mb, checkpointed, extra, lora = (
        c * u for c, u in zip(centre, _nnls(rows, targets), strict=True)
    )
    activation = checkpointed + extra
    divisor = activation / checkpointed if checkpointed > 0 else math.inf
    return Coefficients(
        fixed_mb=fixed_mb,
        activation_mb=activation,
        lora_mb=lora,
        gc_divisor=divisor if activation > 0 else 1.0,
        fixed_measured=fixed is not None,
        shapes=len(points),
        readings=len(points),
    )


def ladder_predictions(model: MemoryModel, shapes: Sequence[RungShape]) -> list[float | None]:
    """Each rung's predicted peak in MB (None before any reading), for ``show``."""
    return [model.predict(shape) for shape in shapes]


@dataclass(frozen=True)
class Skip:
    """A rung the plan passed over: its prediction (None when blind) and why."""

    rung: int
    predicted_mb: float | None
    reason: str

    def __str__(self) -> str:
        return f"skipped rung {self.rung}: {self.reason}"


@dataclass(frozen=True)
class StepPlan:
    """Where to go after a memory stop on ``stopped_rung``.

    ``target`` is the rung to run next, None when no rung is predicted to fit (or none is
    left); ``skips`` the rungs passed over on the way, in order; ``blind`` that there was no
    reading to predict from; ``reason`` one line saying why, for the job's history.
    """

    stopped_rung: int
    target: int | None
    skips: tuple[Skip, ...]
    reason: str
    blind: bool = False
    predicted_mb: float | None = None
    stopped_predicted_mb: float | None = None
    limit_mb: float | None = None


def _mb(value: float) -> str:
    return f"{value:.0f} MB"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.0f}%"


def plan_step_down(
    model: MemoryModel,
    shapes: Sequence[RungShape],
    stopped_rung: int,
    budget_mb: float,
    margin: float = 0.10,
    min_saving: float = 0.05,
) -> StepPlan:
    """After a memory stop on ``stopped_rung``, the first rung below it predicted to fit under
    ``budget_mb * (1 - margin)`` and to save at least ``min_saving`` of the stopped rung's
    predicted peak; every rung passed over is recorded with its prediction and reason. A rung
    predicted under the budget but inside the margin is passed over only for a deeper rung
    that saves ``min_saving`` more than it: a rung that costs a shorter sequence or a lower
    rank for a saving within the prediction's error is the blind ladder's mistake again.

    Without any reading it steps down one rung blind, as the recipe does.
    """
    if not 0 <= stopped_rung < len(shapes):
        raise ValueError(f"stopped_rung {stopped_rung} is not a rung of {len(shapes)}")
    _finite(budget_mb, 0.0, "budget_mb", strict=True)
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    if not 0 <= min_saving < 1:
        raise ValueError(f"min_saving must be in [0, 1), got {min_saving!r}")
    below = range(stopped_rung + 1, len(shapes))
    if not below:
        return StepPlan(
            stopped_rung, None, (), f"no rung left below rung {stopped_rung}", limit_mb=None
        )
    limit = budget_mb * (1 - margin)
    with_margin = f"the {_mb(budget_mb)} budget with a {margin * 100:g}% margin"
    stopped = model.predict(shapes[stopped_rung])
    if stopped is None:
        target = stopped_rung + 1
        return StepPlan(
            stopped_rung,
            target,
            (),
            f"no memory readings yet: stepping down to rung {target} without a prediction",
            blind=True,
            limit_mb=limit,
        )
    skips: list[Skip] = []
    predictions = {rung: model.predict(shapes[rung]) for rung in below}
    for rung in below:
        predicted = predictions[rung]
        assert predicted is not None  # a model with readings predicts every shape
        saving = 1 - predicted / stopped if stopped > 0 else 0.0
        why = []
        if saving < min_saving:
            if saving >= -0.005:
                why.append(f"saves {_percent(max(saving, 0.0))}")
            else:
                why.append(f"{_percent(-saving)} more than rung {stopped_rung}")
        if predicted > limit:
            # Under the budget but inside the margin: a deeper rung is worth its cost (a
            # shorter sequence, a lower rank, all night) only if it saves min_saving more than
            # this one; otherwise this rung's own pre-flight settles it in seconds.
            worth_going_deeper = any(
                (predictions[other] or 0.0) <= predicted * (1 - min_saving)
                for other in below
                if other > rung
            )
            if predicted <= budget_mb and not why and not worth_going_deeper:
                return StepPlan(
                    stopped_rung,
                    rung,
                    tuple(skips),
                    f"rung {rung} is predicted to peak at {_mb(predicted)}, saving"
                    f" {_percent(saving)}: under the {_mb(budget_mb)} budget but inside its"
                    f" {margin * 100:g}% margin, and no rung below saves"
                    f" {_percent(min_saving)} more; its pre-flight decides",
                    predicted_mb=predicted,
                    stopped_predicted_mb=stopped,
                    limit_mb=limit,
                )
            why.append(f"over {with_margin}")
        if why:
            skips.append(Skip(rung, predicted, ", ".join([f"predicted {_mb(predicted)}", *why])))
            continue
        return StepPlan(
            stopped_rung,
            rung,
            tuple(skips),
            f"rung {rung} is predicted to peak at {_mb(predicted)}, saving"
            f" {_percent(saving)} and under {with_margin}",
            predicted_mb=predicted,
            stopped_predicted_mb=stopped,
            limit_mb=limit,
        )
    lowest = min(skips, key=lambda skip: (skip.predicted_mb or 0.0, skip.rung))
    return StepPlan(
        stopped_rung,
        None,
        tuple(skips),
        f"no rung below rung {stopped_rung} is predicted to fit under {with_margin}"
        f" (the smallest prediction is rung {lowest.rung}'s, {_mb(lowest.predicted_mb or 0.0)})",
        stopped_predicted_mb=stopped,
        limit_mb=limit,
    )
