#!/usr/bin/env bash
# The GPU kernel checks in one run, under 8 minutes on an H100, everything written to $OUT:
#
#   1. the compiled kernel tests (pytest -m gpu tests/kernels)           -> $OUT/pytest_gpu.log
#   2. the kernel benchmark on the three Llama-3-8B linears: Pallas kernel, the xla
#      dequantize-then-dot path, tokamax where it imports, bf16; writes the tuning table of the
#      measured winners                         -> $OUT/kernels_*/, $OUT/tuning_table.json
#   3. a tile sweep of w4g128 decode on 4096x14336, merged into the table   -> $OUT/sweep/
#   4. end to end: decode and prefill tokens/s of a random Llama-3-8B-shaped model (8 layers),
#      bf16 vs 4-bit RTN, dispatched with the new table                      -> $OUT/e2e/
#
# Usage (from the repository root): OUT=/some/dir bash experiments/gpu_kernels.sh
# Each step has its own time limit (together 7.3 minutes) and the script goes on when one fails or
# runs out of time (see $OUT/steps.txt and $OUT/STEP.log); copy $OUT/tuning_table.json to
# kernels/tuning_table.json to ship it (the first run starts from the shipped table's sections).
set -u
OUT=${OUT:?set OUT to the output directory}
mkdir -p "$OUT"
STEPS="$OUT/steps.txt"
: > "$STEPS"
START=$(date +%s)

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 )) limit=$limit" | tee -a "$STEPS"
}

python - > "$OUT/environment.txt" 2>&1 <<'EOF'
import jax, jaxlib, sys
print('python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__)
print('backend', jax.default_backend(), 'devices', jax.devices())
print('device_kind', jax.devices()[0].device_kind)
EOF
cat "$OUT/environment.txt"

# 1. Correctness, compiled.
step pytest_gpu 90 python -m pytest -q -m gpu tests/kernels -p no:cacheprovider

TABLE="$OUT/tuning_table.json"
# 2. Side-by-side kernel benchmark, one shape per run (each run merges its winners into the
#    table, so a run that runs out of time loses only its own shape): 4 formats x 3 M.
for shape in 4096x14336 14336x4096 4096x4096; do
  step "kernels_$shape" 60 python -m experiments.bench_kernels --sections=kernels \
    --shapes="$shape" --ms=1,16,256 --formats=w4g128,w4g128_act,w4g128_act_perm,s24_w4g128 \
    --trials=3 --target_ms=10 --copy_mb=256 --write_tuning="$TABLE" \
    --out_dir="$OUT/kernels_$shape"
done

# 3. Tile sweep at decode (one row), merged into the same table.
step sweep 55 python -m experiments.bench_kernels --sections=kernels --shapes=4096x14336 \
  --ms=1 --formats=w4g128 --sweep=w4g128 --nowith_tokamax --trials=3 --target_ms=10 \
  --copy_mb=256 --write_tuning="$TABLE" --out_dir="$OUT/sweep"

# 4. End to end through the model code, dispatched with the table just written.
if [ -f "$TABLE" ]; then export COMPRESS_RECOVER_KERNEL_TABLE="$TABLE"; fi
step e2e 110 python -m experiments.bench_kernels --sections=e2e --e2e_models=llama3-8b-random \
  --e2e_layers=8 --new_tokens=32 --prefill_len=512 --trials=3 --copy_mb=256 --out_dir="$OUT/e2e"

echo "total seconds=$(( $(date +%s) - START ))" | tee -a "$STEPS"
