#!/usr/bin/env bash
# Every GPU check and benchmark in one script, for a lent GPU machine (run from the repository root).
# Needs .gpu/cifar_subset.npz (bench/subset_archive.py pack) and, where pydantic is missing, wheels in .whl/.
# Each phase has its own time limit and a failing phase does not stop the next. Logs and small results are packed
# into $OUT/gpu_results.tgz (checkpoints left out) and the headline figures go to $OUT/summary.txt.
# The training images: /tmp/cifar100 is the subset as packed; /tmp/cifar100_full the same images repeated (hard links)
# to CIFAR-100's 500 train / 100 test per class, so an epoch costs what a full one does (timings only).
# A CPU dry run of the same path (the CUDA-graph phases run eagerly, without cuda_graph):
#   DEVICE=cpu GRAPH=false EPOCHS=1 MILESTONES=[] TABLE_JOBS=2 BENCH_PRESET=smoke TABLE_PRESET=smoke BATCH=32
#   EXTRA_ARGS='-o common.data.max_train_per_class=10 -o common.data.max_test_per_class=5' PHASES="step graph_train
#   table" GRAPH_TRAIN_ARGS='--modes eager --epochs 2 --rounds 1 -o data.max_train_per_class=10'
#   bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
LOGS=/tmp/gpu_logs
RUNS=/tmp/gpu_runs
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-30}
MILESTONES=${MILESTONES:-[5,10,20]}
GRAPH=${GRAPH:-true}  # cuda_graph for the table
TABLE_DATA=${TABLE_DATA:-/tmp/cifar100}  # /tmp/cifar100_full: the full-size timing
BATCH=${BATCH:-512}
# Which of the numbered phases below run.
PHASES=${PHASES:-step graph_train search table compile}
BUDGET=${BUDGET:-560}  # seconds for the whole script: each phase is cut to what is left, so the packing still runs
rm -rf "$LOGS" "$RUNS"
mkdir -p "$OUT" "$LOGS" "$RUNS"

pack() {
  (cd /tmp && find gpu_runs -name '*.json' -o -name '*.md' -o -name '*.png' | tar -czf "$OUT/gpu_results.tgz" gpu_logs -T -)
  cat "$LOGS/summary.txt" > "$OUT/summary.txt" 2>/dev/null
}
trap pack EXIT
note() { echo "$*" | tee -a "$LOGS/summary.txt"; }
wanted() { [[ " $PHASES " == *" $1 "* ]]; }
phase() {  # name, time limit in seconds, command...: logs to $LOGS/<name>.txt and notes the wall time
  local name=$1 limit=$2; shift 2
  local start=$SECONDS left=$((BUDGET - SECONDS - 10))
  [ "$left" -lt "$limit" ] && limit=$left
  [ "$limit" -lt 5 ] && { note "phase $name: skipped, out of time"; return; }
  timeout "$limit" "$@" > "$LOGS/$name.txt" 2>&1
  note "phase $name: exit $?, $((SECONDS - start)) s"
}

if ! python3 -c "import pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 ADVBCT_CACHE=/tmp/advbct-cache
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; nproc; } | tee -a "$LOGS/summary.txt"
# A second call on the same warm machine finds the images already unpacked.
[ -d /tmp/cifar100/test ] || phase unpack 120 python3 bench/subset_archive.py unpack .gpu/cifar_subset.npz /tmp/cifar100
if [ ! -d /tmp/cifar100_full/test ]; then
  cp -al /tmp/cifar100 /tmp/cifar100_full
  phase fill 60 python3 bench/subset_archive.py fill /tmp/cifar100_full --train-per-class 500 --test-per-class 100
fi

# 1. Step throughput of every method against the plain classification step, measured in the same process.
wanted step && phase bench_step 150 python3 bench/bench_step.py --device "$DEVICE" --preset "${BENCH_PRESET:-paper-cifar100}" \
  --batch-size "$BATCH" --warmup 5 --repeats 5 --steps-per-sample 10
cat "$LOGS/bench_step.txt" >> "$LOGS/summary.txt" 2>/dev/null

# 1b. The CUDA-graph training path: its GPU test, then real AdvBCT training eager against graphed, alternating.
wanted graph_train && phase gpu_tests 90 python3 -m pytest -q -rf -p no:cacheprovider tests/test_cuda_graph.py
tail -3 "$LOGS/gpu_tests.txt" >> "$LOGS/summary.txt" 2>/dev/null
# A failed GPU test turns its feature off for the table, in this call and in later calls on the same warm machine.
if [ -f "$LOGS/gpu_tests.txt" ]; then
  : > /tmp/gpu_fallback.env
  grep -q "\(FAILED\|ERROR\).*\(graphed_advbct_run\|one_captured_step\)" "$LOGS/gpu_tests.txt" \
    && echo "GRAPH=false" >> /tmp/gpu_fallback.env
fi
if [ -s /tmp/gpu_fallback.env ]; then
  note "GPU test failures turn off: $(tr '\n' ' ' < /tmp/gpu_fallback.env)"
  . /tmp/gpu_fallback.env
fi
# Every loss's overhead over the step with the old forward, all steps replayed from CUDA graphs: what the losses'
# kernels cost once launch overhead is gone.
wanted graph_train && [ "$GRAPH" = true ] && phase bench_step_graph "${STEP_GRAPH_TIMEOUT:-120}" python3 \
  bench/bench_step.py --device "$DEVICE" --preset "${BENCH_PRESET:-paper-cifar100}" --batch-size "$BATCH" \
  --warmup 3 --repeats 31 --steps-per-sample 10 --cuda-graph
cat "$LOGS/bench_step_graph.txt" >> "$LOGS/summary.txt" 2>/dev/null
# Real training at batch 512 on the full-size folder (graphed unless a graph test failed): AdvBCT's images/s against
# independent's, the cost of its loss in a whole run rather than a single step.
TRAIN_MODE=$([ "$GRAPH" = true ] && echo graphed || echo eager)
wanted graph_train && phase train_graph 240 python3 bench/bench_train_graph.py --data /tmp/cifar100_full \
  --preset "${BENCH_PRESET:-paper-cifar100}" --device "$DEVICE" ${GRAPH_TRAIN_ARGS:---methods independent,advbct \
  --modes $TRAIN_MODE --epochs 3 --rounds 1 -o optim.batch_size=$BATCH}
cat "$LOGS/train_graph.txt" >> "$LOGS/summary.txt" 2>/dev/null

# 2. exact_search on the device returns what it returns on the CPU.
wanted search && phase search 60 python3 - <<PY
import torch
from advbct.evaluation.search import exact_search
torch.manual_seed(0)
q, g = torch.nn.functional.normalize(torch.randn(2000, 256), dim=1), torch.nn.functional.normalize(torch.randn(50000, 256), dim=1)
cpu = exact_search(q, g, 100)
dev = exact_search(q.to("$DEVICE"), g.to("$DEVICE"), 100)
print([t.shape for t in cpu], "device:", dev[0].device)
same = (cpu[1] == dev[1].cpu()).float().mean().item()
print(f"ranks equal at {same:.6f} of positions; max score diff {(cpu[0] - dev[0].cpu()).abs().max().item():.2e}")
PY
cat "$LOGS/search.txt" >> "$LOGS/summary.txt" 2>/dev/null

# 3. The CIFAR-100 table, extended-class and extended-data from one command: both old models, then the 14 new models
# in one pool, TABLE_JOBS at a time.
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$LOGS/gpu_util.csv" 2>/dev/null &
monitor=$!
wanted table && phase table "${TABLE_TIMEOUT:-480}" python3 -m advbct bench --settings extended-class,extended-data \
  --out "$RUNS/table" --preset "${TABLE_PRESET:-cifar100}" --data "$TABLE_DATA" --device "$DEVICE" --no-progress \
  --jobs "${TABLE_JOBS:-14}" --methods "${METHODS:-l2,bct,lce,unibct,hot-refresh,advbct}" \
  -o "common.optim.epochs=$EPOCHS" -o "common.optim.milestones=$MILESTONES" -o "common.cuda_graph=$GRAPH" \
  ${EXTRA_ARGS:-}
cat "$RUNS/table/results.md" >> "$LOGS/summary.txt" 2>/dev/null

kill "$monitor" 2>/dev/null

# 4. The same step benchmark with torch.compile, for AdvBCT, last as it compiles first.
wanted compile && phase bench_step_compiled "${COMPILE_TIMEOUT:-120}" python3 bench/bench_step.py --device "$DEVICE" \
  --preset "${BENCH_PRESET:-paper-cifar100}" --batch-size "$BATCH" --warmup 5 --repeats 5 --steps-per-sample 10 \
  --methods advbct --compile
cat "$LOGS/bench_step_compiled.txt" >> "$LOGS/summary.txt" 2>/dev/null
