#!/usr/bin/env bash
# Every GPU check and benchmark in one script, for a lent GPU machine (run from the repository root).
# Needs .gpu/cifar_subset.npz (bench/subset_archive.py pack) and, where pydantic is missing, wheels in .whl/.
# Writes its figures and results under $OUT. A CPU dry run of the same path:
#   DEVICE=cpu EPOCHS=1 MILESTONES=[] BENCH_PRESET=smoke EXTRA_ARGS='-o common.data.max_train_per_class=10
#   -o common.data.max_test_per_class=5 -o common.model.backbone_kwargs={layers:[1,1,1,1]}' bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-30}
MILESTONES=${MILESTONES:-[5,10,20]}
mkdir -p "$OUT"
if ! python3 -c "import pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 ADVBCT_CACHE=/tmp/advbct-cache
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } | tee "$OUT/env.txt"
python3 bench/subset_archive.py unpack .gpu/cifar_subset.npz /tmp/cifar100 || exit 1

python3 bench/bench_step.py --device "$DEVICE" --preset "${BENCH_PRESET:-paper-cifar100}" --batch-size 256 \
  ${BENCH_METHODS:+--methods "$BENCH_METHODS"} 2>&1 | tee "$OUT/bench_step.txt"

run() {  # name, timeout, advbct subcommand and its arguments
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" python3 -m advbct "$@" --preset paper-cifar100 --data /tmp/cifar100 --device "$DEVICE" \
    --no-progress -o "common.optim.epochs=$EPOCHS" -o "common.optim.milestones=$MILESTONES" ${EXTRA_ARGS:-} 2>&1 \
    | tee "$OUT/$name.txt"
  echo "$name: $((SECONDS - start)) s" | tee -a "$OUT/timing.txt"
}
run quickstart "${QS_TIMEOUT:-260}" quickstart --out /tmp/runs/class
cp /tmp/runs/class/results.json "$OUT/quickstart_class.json" 2>/dev/null
run compare "${CMP_TIMEOUT:-280}" compare --out /tmp/runs/class --methods "${METHODS:-bct,lce,unibct,hot-refresh,l2,advbct}"
# If the comparison ran out of time, evaluate the methods that did finish (training is skipped for them).
finished=$(cd /tmp/runs/class && ls -d */model.pt 2>/dev/null | cut -d/ -f1 | grep -vx -e old -e independent | paste -sd,)
if [ ! -f /tmp/runs/class/results.json ] || ! grep -q '"l2"' /tmp/runs/class/results.json; then
  [ -n "$finished" ] && run compare_finished 90 compare --out /tmp/runs/class --methods "$finished"
fi
cp /tmp/runs/class/results.json "$OUT/compare_class.json" 2>/dev/null
python3 - <<'PY' | tee -a "$OUT/timing.txt"
import json, pathlib
for run in sorted(pathlib.Path("/tmp/runs/class").iterdir()):
    hist = run / "history.json"
    if hist.is_file():
        h = json.loads(hist.read_text())
        print(f"{run.name}: {len(h)} epochs, median {sorted(e['images_per_s'] for e in h)[len(h) // 2]:.0f} img/s")
PY
