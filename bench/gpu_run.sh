#!/usr/bin/env bash
# The whole GPU session, as one script for the device machine's second call.
#
# Call 1 carried .whl1/ (the first part of the mlx-cuda-13 wheel) and copied it to /tmp/w;
# this call carries .whl/ (the second part, its sha256 and the other wheels). The script
#   0. joins and checks the wheel, installs everything under /tmp/site (no network there),
#      makes `import loractl` work from this checkout (common/ daemon/ supervisor/ client/
#      launchd/ copied to /tmp/pkg/loractl as pyproject's package-dir maps them, so the code is
#      always this checkout's), prints nvidia-smi and the versions, and checks a GPU matmul;
#   1. builds the Mistral-7B-shaped 4-bit model and its data under $WORK (bench/gpu_model.py);
#   2. probes: our trainer alone, 10 steps of the bench's job; the CUDA kernels are compiled
#      here (about 100 s on a fresh machine, cached on disk for every later process) and its
#      step time sizes the benchmark to the time left;
#   3. bench/overhead.py --model: ours against mlx_lm.lora, same job, LoRA on 16 layers,
#      batch 1, max_seq_length 512 (prints throughput_ratio= and peak_memory_ratio=);
#   4. bench/gpu_oom.py: a real CUDA out-of-memory under the supervisor, stepped down.
# Each step's output is teed to $OUT/*.log as it runs, so it comes back even on a timeout;
# each step has a time cap inside an overall deadline (GPU_RUN_DEADLINE, 560 s by default, for
# a call of 600 s), and about OOM_RESERVE (200) seconds are kept for step 4.
#
# Local dry run on a CPU (no install, a toy model, a simulated memory budget):
#   GPU_RUN_LOCAL=1 PY=.venv/bin/python OUT=/tmp/gpu-run-out \
#     MODEL_ARGS="--layers 2 --hidden 128 --heads 4 --kv-heads 2 --intermediate 256 \
#       --vocab 2048" BENCH_SHAPE="--lora-layers 2 --max-seq-length 256 --batch-size 1" \
#     OOM_ARGS="--batch-size 16 --max-seq-length 1024 --lora-layers 2 --words 1000 \
#       --ladder '[{\"batch_size\":4,\"max_seq_length\":512},{\"batch_size\":1,\"max_seq_length\":128}]' \
#       --simulate-budget-mb auto" bash bench/gpu_run.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-run-out}
mkdir -p "$OUT"
REPO=$PWD
PY=${PY:-python3}
T0=$SECONDS
DEADLINE=${GPU_RUN_DEADLINE:-560}
OOM_RESERVE=${OOM_RESERVE:-200}
WHEEL=mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
WORK=${WORK:-/tmp/lc}
MODEL_ARGS=${MODEL_ARGS:-}
BENCH_SHAPE=${BENCH_SHAPE:---lora-layers 16 --max-seq-length 512 --batch-size 1}
BENCH_EXTRA=${BENCH_EXTRA:---warmup 3}
OOM_ARGS=${OOM_ARGS:-}

left() { echo $((DEADLINE - (SECONDS - T0))); }
# Seconds for the next step: its own cap, or what is left before the deadline if less.
cap() {
    local want=$1 rest
    rest=$(left)
    if ((rest < want)); then want=$rest; fi
    if ((want < 5)); then want=5; fi
    echo "$want"
}
stamp() { echo "=== [t=$((SECONDS - T0))s] $*"; }

# -- 0. install --------------------------------------------------------------------------------

setup() {
    stamp "setup"
    if [[ -n ${GPU_RUN_LOCAL:-} ]]; then
        echo "GPU_RUN_LOCAL: no install, $PY as it is"
        return 0
    fi
    if [[ ! -f /tmp/w/$WHEEL.part-aa ]]; then
        echo "FATAL: /tmp/w/$WHEEL.part-aa is missing: call 1 (cp .whl1/* /tmp/w/) ran on" \
            "another machine, or this one was given back in between. Run call 1 again."
        return 1
    fi
    cat "/tmp/w/$WHEEL.part-aa" ".whl/$WHEEL.part-ab" >"/tmp/w/$WHEEL" || return 1
    (cd /tmp/w && sha256sum -c "$REPO/.whl/$WHEEL.sha256") || return 1
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl "/tmp/w/$WHEEL" || return 1
    # libmlx.so looks for the CUDA libraries at $ORIGIN/../../nvidia/{cu13,cudnn,nccl}/lib
    # (its RPATH) and NVRTC for the CUDA headers at /tmp/site/nvidia/cu13/include: point
    # /tmp/site/nvidia at the image's own NVIDIA wheels (PyTorch's).
    local nv
    nv=$($PY -c 'import nvidia; print(list(nvidia.__path__)[0])')
    if [[ -n $nv && -d $nv ]]; then
        echo "the image's NVIDIA wheels: $nv: $(ls "$nv" | tr '\n' ' ')"
        ln -sfn "$nv" /tmp/site/nvidia
    else
        echo "WARNING: no nvidia package beside $PY; relying on the system's library path"
    fi
    rm -rf /tmp/pkg && mkdir -p /tmp/pkg/loractl || return 1
    cp common/*.py /tmp/pkg/loractl/ || return 1
    for d in daemon supervisor client launchd; do cp -r "$d" /tmp/pkg/loractl/ || return 1; done
    echo "ldd libmlx.so (CUDA libraries, and any not found):"
    ldd /tmp/site/mlx/lib/libmlx.so | grep -E "not found|nvidia|libcu|cudnn|nccl|nvrtc"
    return 0
}

if [[ -z ${GPU_RUN_LOCAL:-} ]]; then
    export PYTHONPATH=/tmp/pkg:/tmp/site
fi
setup 2>&1 | tee "$OUT/setup.log"
if ((PIPESTATUS[0] != 0)); then
    echo "FATAL: setup failed" | tee -a "$OUT/setup.log"
    exit 1
fi
if [[ -z ${GPU_RUN_LOCAL:-} ]]; then
    # Belt and braces beside the RPATH.
    for d in /tmp/site/nvidia/*/lib; do LD_LIBRARY_PATH=$d:${LD_LIBRARY_PATH:-}; done
    export LD_LIBRARY_PATH
fi

versions() {
    stamp "versions"
    nvidia-smi 2>&1 | head -20
    $PY - <<'EOF'
import platform, sys
import mlx.core as mx
import mlx_lm, structlog, transformers, tokenizers, watchdog, yaml, zmq  # noqa: F401
import loractl
print("python", platform.python_version(), sys.executable)
print("mlx", mx.__version__, "mlx_lm", mlx_lm.__version__, "transformers",
      transformers.__version__, "tokenizers", tokenizers.__version__, "pyzmq", zmq.__version__,
      "structlog", structlog.__version__, "loractl", loractl.__version__, loractl.__file__)
print("default device", mx.default_device(),
      "cuda available", getattr(getattr(mx, "cuda", None), "is_available", lambda: "?")())
try:
    print("device info", mx.device_info())
except Exception as exc:  # older or other builds
    print("device info unavailable:", exc)
a = mx.random.normal((2048, 2048), dtype=mx.bfloat16)
print("matmul check", (a @ a).astype(mx.float32).abs().mean().item())
EOF
}
versions 2>&1 | tee -a "$OUT/setup.log"
if ((PIPESTATUS[0] != 0)); then
    echo "FATAL: the versions check failed" | tee -a "$OUT/setup.log"
    exit 1
fi

# GPU memory and load once a second for the whole session, for the record.
NVSMI_PID=
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,memory.used,memory.total,utilization.gpu \
        --format=csv,noheader -l 1 >"$OUT/nvsmi.csv" 2>&1 &
    NVSMI_PID=$!
fi
finish() {
    [[ -n $NVSMI_PID ]] && kill "$NVSMI_PID" 2>/dev/null
    echo "=== summary [t=$((SECONDS - T0))s]: model=${MODEL_RC:-} probe=${PROBE_RC:-}" \
        "overhead=${BENCH_RC:-} gpu_oom=${OOM_RC:-}"
    grep -h -E "^(throughput_ratio|peak_memory_ratio|mlx_peak_ratio)=|^gpu_oom=" \
        "$OUT/overhead.log" "$OUT/gpu_oom.log" 2>/dev/null
}

# -- 1. the model ------------------------------------------------------------------------------

stamp "build the model" | tee "$OUT/model.log"
# shellcheck disable=SC2086
timeout -k 10 "$(cap 200)" $PY bench/gpu_model.py "$WORK/m" $MODEL_ARGS 2>&1 |
    tee -a "$OUT/model.log"
MODEL_RC=${PIPESTATUS[0]}
du -sh "$WORK/m/model" 2>&1 | tee -a "$OUT/model.log"
if ((MODEL_RC != 0)); then
    echo "FATAL: the model build exited $MODEL_RC" | tee -a "$OUT/model.log"
    finish
    exit 1
fi

# -- 2. the probe: kernels compiled, step time measured ------------------------------------------

stamp "probe: our trainer alone, 10 steps (compiles the CUDA kernels)" | tee "$OUT/probe.log"
# shellcheck disable=SC2086
$PY - "$WORK" $BENCH_SHAPE <<'EOF' 2>&1 | tee -a "$OUT/probe.log"
import sys, yaml
from pathlib import Path
work, flags = Path(sys.argv[1]), sys.argv[2:]
shape = dict(zip(flags[::2], flags[1::2]))
job = {
    "model": str(work / "m" / "model"), "data": str(work / "m" / "data"),
    "fine_tune_type": "lora", "optimizer": "adamw",
    "num_layers": int(shape["--lora-layers"]), "batch_size": int(shape["--batch-size"]),
    "iters": 10, "learning_rate": 1.0e-4,
    "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
    "max_seq_length": int(shape["--max-seq-length"]), "val_batches": 0,
    "steps_per_eval": 10**6, "steps_per_report": 1, "checkpoint_every": 100,
    "adapter_path": str(work / "probe" / "adapters"),
}
(work / "probe").mkdir(parents=True, exist_ok=True)
(work / "probe" / "job.yaml").write_text(yaml.safe_dump(job))
print(yaml.safe_dump(job))
EOF
PROBE_START=$SECONDS
timeout -k 10 "$(cap 240)" $PY -m loractl.daemon.trainer "$WORK/probe/job.yaml" --fresh \
    >>"$OUT/probe.log" 2>&1
PROBE_RC=$?
PROBE_WALL=$((SECONDS - PROBE_START))
stamp "probe exited $PROBE_RC after ${PROBE_WALL}s" | tee -a "$OUT/probe.log"
# Sizing: per bench run, load + iters x step; 2 rounds of 2 runs in what is left before
# the gpu_oom reserve (at most 300 s), 30-150 iterations; 1 round if 2 would be too short.
SIZING=$($PY - "$WORK/probe/adapters/train.log" "$(left)" "$OOM_RESERVE" <<'EOF'
import json, statistics, sys
from datetime import datetime
log, left, reserve = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
events = []
try:
    events = [json.loads(line) for line in open(log)]
except (OSError, ValueError):
    pass
ts = lambda e: datetime.fromisoformat(e["timestamp"]).timestamp()
steps = [e for e in events if e.get("event") == "step"]
starts = [e for e in events if e.get("event") == "attempt starting"]
training = [e for e in events if e.get("event") == "training"]
step_s = statistics.median(e["step_seconds"] for e in steps[3:]) if len(steps) > 4 else 1.0
load_s = ts(training[0]) - ts(starts[0]) + 8 if starts and training else 30.0
budget = max(60, min(300, left - reserve))
for rounds in (2, 1):
    iters = int((budget / (2 * rounds) - load_s) / step_s)
    if iters >= 40 or rounds == 1:
        break
iters = max(30, min(150, iters))
print(f"ROUNDS={rounds} ITERS={iters} BUDGET={budget} STEP_S={step_s:.3f} LOAD_S={load_s:.1f}")
EOF
)
echo "sizing: $SIZING" | tee -a "$OUT/probe.log"
ROUNDS=$(sed -n 's/.*ROUNDS=\([0-9]*\).*/\1/p' <<<"$SIZING")
ITERS=$(sed -n 's/.*ITERS=\([0-9]*\).*/\1/p' <<<"$SIZING")
BUDGET=$(sed -n 's/.*BUDGET=\([0-9]*\).*/\1/p' <<<"$SIZING")
ROUNDS=${BENCH_ROUNDS:-${ROUNDS:-2}}
ITERS=${BENCH_ITERS:-${ITERS:-60}}
BUDGET=${BUDGET:-240}

# -- 3. the overhead benchmark -----------------------------------------------------------------

stamp "overhead: ours vs mlx_lm.lora, $ROUNDS rounds of $ITERS iterations" |
    tee "$OUT/overhead.log"
# shellcheck disable=SC2086
timeout -k 15 "$(cap $((BUDGET + 30)))" $PY bench/overhead.py --model "$WORK/m/model" \
    --out "$WORK/bench" $BENCH_SHAPE --rounds "$ROUNDS" --iters "$ITERS" $BENCH_EXTRA 2>&1 |
    tee -a "$OUT/overhead.log"
BENCH_RC=${PIPESTATUS[0]}
cp "$WORK/bench/results.json" "$OUT/overhead-results.json" 2>/dev/null
stamp "overhead exited $BENCH_RC" | tee -a "$OUT/overhead.log"

# -- 4. out of memory under the supervisor -----------------------------------------------------

stamp "out of memory under the supervisor" | tee "$OUT/gpu_oom.log"
OOM_CAP=$(cap 400)
# eval: OOM_ARGS may hold a quoted JSON ladder. gpu_oom.py stops waiting for the job 40 s
# before the cap, to stop the supervisor (and its trainer) itself.
eval "timeout -k 15 $OOM_CAP $PY bench/gpu_oom.py --model '$WORK/m/model' --work '$WORK/oom' \
    --timeout $((OOM_CAP > 80 ? OOM_CAP - 40 : 40)) $OOM_ARGS" 2>&1 | tee -a "$OUT/gpu_oom.log"
OOM_RC=${PIPESTATUS[0]}
{
    echo "--- supervisor.log (tail)"
    tail -c 20000 "$WORK/oom/supervisor.log" 2>&1
    for f in "$WORK"/oom/home/jobs/*/attempts/*.stderr; do
        [[ -f $f ]] || continue
        echo "--- $f (tail)"
        tail -c 6000 "$f"
    done
} >"$OUT/gpu_oom-detail.log" 2>&1
stamp "gpu_oom exited $OOM_RC" | tee -a "$OUT/gpu_oom.log"

finish
if ((BENCH_RC != 0 || OOM_RC != 0)); then exit 1; fi
