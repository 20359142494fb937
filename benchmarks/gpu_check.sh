#!/usr/bin/env bash
# The prepared GPU check: one command on a machine with one NVIDIA GPU, about 8 minutes.
#
#   FMLJAX_OMNIGLOT=/path/omniglot.npz bash benchmarks/gpu_check.sh [--dry-run] [--wheels=DIR]
#
# 1. Environment: a virtual environment `.venv-gpu` (with the machine's site packages, so a
#    preinstalled CUDA jax is visible) holding fmljax. It installs the CUDA build of the pinned
#    jax (`jax[cuda13]`, else `jax[cuda12]`, within pyproject.toml's range) when a package index
#    is reachable; offline, it keeps the machine's own CUDA jax and says so (the JSON lines
#    record the jax version that ran). Pure-Python dependencies that are missing come from
#    `--wheels=DIR` (made beforehand with `pip download --no-deps -d DIR ml-collections ...`)
#    or the index.
# 2. The throughput targets of benchmarks/RESULTS.md with the default flags, each interleaved
#    against its baselines in one process (`benchmarks/throughput.py --baseline`, plus
#    `--pytorch` where torch is importable): omniglot-5w1s second-order MAML, 1 inner step;
#    omniglot-5w1s-pool; fed-round Conv4 with 32 clients.
# 3. Omniglot 5-way 1-shot, second order, the reference config (`omniglot_maml.py:5w1s,full`)
#    for 2,000 iterations, then a smoke run of each `:<N>w<K>s,full` command, unchanged, for
#    its first call (it must compile and train; the run is cut by `timeout` after that).
#
# Output: benchmarks/results/gpu-<card>.jsonl (every throughput JSON line, tagged, and one
# line per Omniglot run) and benchmarks/results/gpu-<card>-summary.md. Each step has its own
# time limit, so that a slow step cannot take the whole budget; a step that fails or times
# out is recorded as such and the check goes on. `--dry-run` prints the plan (the commands and
# their limits) and exits; it needs neither a GPU nor the data.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
WHEELS=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --wheels=*) WHEELS="${a#--wheels=}" ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $a (allowed: --dry-run, --wheels=DIR)" >&2; exit 2 ;;
  esac
done

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  CARD_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
else
  CARD_NAME=""
fi
if [ -z "$CARD_NAME" ] && [ "$DRY" = 0 ]; then
  echo "gpu_check.sh: no NVIDIA GPU found (nvidia-smi -L); use --dry-run to see the plan" >&2
  exit 2
fi
CARD="$(echo "${CARD_NAME:-none}" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-*$//')"
OUT="benchmarks/results/gpu-${CARD}.jsonl"
SUMMARY="benchmarks/results/gpu-${CARD}-summary.md"
WORK="${TMPDIR:-/tmp}/fmljax-gpu-check"
PY="python"

# name | time limit (s) | command
STEPS=(
  "omniglot-5w1s|45|benchmarks/throughput.py --workload=omniglot-5w1s --method=maml --inner-steps=1 --baseline --steps=10 --json"
  "omniglot-5w1s-pool|45|benchmarks/throughput.py --workload=omniglot-5w1s-pool --method=maml --inner-steps=1 --baseline --steps=10 --json"
  "fed-round-conv4|50|benchmarks/throughput.py --workload=fed-round --model=conv4 --method=fedmeta-maml --inner-steps=1 --clients=32 --baseline --steps=10 --json"
  "omniglot-5w1s-2000|135|experiments/main.py --config=experiments/configs/omniglot_maml.py:5w1s,full --config.algorithm=fedmeta-maml --config.num_rounds=2000 --config.eval_every=500 --config.checkpoint_every=1000 --workdir=$WORK/omniglot_5w1s_2000"
  "smoke-5w1s-full|25|experiments/main.py --config=experiments/configs/omniglot_maml.py:5w1s,full --workdir=$WORK/full_5w1s"
  "smoke-5w5s-full|30|experiments/main.py --config=experiments/configs/omniglot_maml.py:5w5s,full --workdir=$WORK/full_5w5s"
  "smoke-20w1s-full|50|experiments/main.py --config=experiments/configs/omniglot_maml.py:20w1s,full --workdir=$WORK/full_20w1s"
  "smoke-20w5s-full|50|experiments/main.py --config=experiments/configs/omniglot_maml.py:20w5s,full --workdir=$WORK/full_20w5s"
)

BUDGET=480  # the check's promise: setup and every step's limit add up to at most 8 minutes
total=45  # setup: the venv and (online) the CUDA jax wheels
for s in "${STEPS[@]}"; do total=$((total + $(echo "$s" | cut -d'|' -f2))); done
if [ "$total" -gt "$BUDGET" ]; then
  echo "gpu_check.sh: the steps' limits add up to $total s, over the $BUDGET s budget" >&2
  exit 1
fi

if [ "$DRY" = 1 ]; then
  echo "gpu_check.sh plan (card: ${CARD_NAME:-none found}; output $OUT and $SUMMARY)"
  echo "  setup (<= 45 s): python3 -m venv --system-site-packages .venv-gpu;" \
    "pip install 'jax[cuda13]>=0.10,<0.11' (else cuda12; offline: the machine's jax);" \
    "pip install --no-deps -e .; missing dependencies from ${WHEELS:-the index}"
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$s"
    printf '  %-20s <= %3s s: %s %s\n' "$name" "$limit" "$PY" "$cmd"
  done
  echo "  total time limit: ${total} s of ${BUDGET} (FMLJAX_OMNIGLOT=${FMLJAX_OMNIGLOT:-<unset: needed>})"
  exit 0
fi

if [ -z "${FMLJAX_OMNIGLOT:-}" ] || [ ! -f "$FMLJAX_OMNIGLOT" ]; then
  echo "gpu_check.sh: FMLJAX_OMNIGLOT must name omniglot.npz (got '${FMLJAX_OMNIGLOT:-}')" >&2
  exit 2
fi

T0=$(date +%s)
mkdir -p benchmarks/results "$WORK"
rm -rf "$WORK"/omniglot_* "$WORK"/full_*
python3 -m venv --system-site-packages .venv-gpu
. .venv-gpu/bin/activate
PIP=(python -m pip install --quiet --disable-pip-version-check)
JAX_NOTE="installed the CUDA build of the pinned jax"
if ! timeout 15 "${PIP[@]}" "jax[cuda13]>=0.10,<0.11" 2>/dev/null &&
  ! timeout 15 "${PIP[@]}" "jax[cuda12]>=0.10,<0.11" 2>/dev/null; then
  JAX_NOTE="offline or no CUDA wheel: the machine's own jax"
fi
"${PIP[@]}" --no-deps -e . >/dev/null 2>&1
for mod_pkg in ml_collections:ml-collections absl:absl-py optax:optax chex:chex flax:flax \
  orbax.checkpoint:orbax-checkpoint PIL:pillow matplotlib:matplotlib; do
  mod="${mod_pkg%%:*}"
  pkg="${mod_pkg#*:}"
  if ! python -c "import $mod" 2>/dev/null; then
    if [ -n "$WHEELS" ]; then
      "${PIP[@]}" --no-index --find-links="$WHEELS" "$pkg" >/dev/null 2>&1
    else
      timeout 5 "${PIP[@]}" "$pkg" >/dev/null 2>&1
    fi
  fi
done
python - <<'EOF'
import jax
print(f"jax {jax.__version__} on {jax.devices()}")
EOF
if python -c "import torch" 2>/dev/null; then TORCH="--pytorch"; else TORCH=""; fi

: >"$OUT.tmp"
{
  echo "# GPU check: ${CARD_NAME}"
  echo
  echo "Command: \`FMLJAX_OMNIGLOT=... bash benchmarks/gpu_check.sh\`; $(date -u +%F), code" \
    "\`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\`," \
    "$(python -c 'import jax; print("jax", jax.__version__)'); $JAX_NOTE." \
    "PyTorch baseline: ${TORCH:-not installed, not run}."
  echo
  echo "| step | status | wall s | figures |"
  echo "|---|---|---|---|"
} >"$SUMMARY.tmp"

for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$s"
  case "$name" in omniglot-5w1s|omniglot-5w1s-pool) cmd="$cmd $TORCH" ;; esac
  t=$(date +%s)
  log="$WORK/$name.log"
  case "$cmd" in experiments/*) tag="" ;; *) tag="--tag=gpu_check:$name" ;; esac
  rc=0
  timeout "$limit" $PY $cmd $tag >"$log" 2>&1 || rc=$?
  [ -z "$tag" ] || grep '^{' "$log" >>"$OUT.tmp"
  wall=$(($(date +%s) - t))
  status="ok"
  if [ "$rc" = 124 ]; then status="time limit"; elif [ "$rc" != 0 ]; then status="failed ($rc)"; fi
  case "$name" in smoke-*)  # a smoke run passes once its first call has trained
    if grep -q "round [0-9]*/" "$log"; then status="ok (first call trained, then cut)"; fi ;;
  esac
  figures="$(python benchmarks/gpu_summary.py "$name" "$log" "$WORK" 2>/dev/null | tr '\n' ' ')"
  [ -n "$(echo "$figures" | tr -d ' ')" ] || figures="$(tail -1 "$log" | cut -c1-160)"
  echo "| $name | $status | $wall | $figures |" >>"$SUMMARY.tmp"
  python benchmarks/gpu_summary.py --json "$name" "$log" "$WORK" "$status" "$wall" \
    "$CARD_NAME" >>"$OUT.tmp" 2>/dev/null || true
done
mv "$OUT.tmp" "$OUT"
mv "$SUMMARY.tmp" "$SUMMARY"
echo "gpu_check.sh: $(($(date +%s) - T0)) s in all; wrote $OUT and $SUMMARY"
cat "$SUMMARY"
