#!/usr/bin/env bash
# GPU readiness in one command (< 5 minutes), run from the repository root:
#
#   bench/gpu.sh OUT_DIR            # on a GPU machine
#   bench/gpu.sh OUT_DIR --quick    # tiny sizes, seconds per step: checks the script on a CPU
#
# Steps, each under its own time limit taken from one 5-minute budget, each writing into OUT_DIR:
#   1. devices.json      jax's backend and devices (and nvidia-smi's view, when present)
#   2. parity.xml        HF parity tests (logits vs PyTorch BART, max |diff| < 1e-4) on this
#                        backend. float32 matmuls on GPUs default to TF32; tests/model/conftest.py
#                        sets jax_default_matmul_precision=highest there (never the model code).
#   3. bench_bf16.json   `python -m bench --sections=train --no_torch` at BART-base size in bfloat16
#                        (d_model 768, 12 heads, ffn 3072, 6+6 layers, vocab 50265, seq 512+512,
#                        batch 8): step time, tokens/s and MFU against a bf16 matmul peak measured in
#                        the same run (--peak_n=8192; 2048 on --quick)
#   4. world/            the main job, `python -m meta_mask.train --flagfile=experiments/world.flags`
#                        (world_quick.flags on --quick), its results.json files and summary.md
#   5. gpu.json          every step's exit code, seconds and whether it hit its limit; the bench's
#                        step time, tokens/s and MFU; the main job's results.json paths
# A step that fails or runs out of time is recorded and the next one still runs; the exit code is
# that of the first failed step (0 if all passed).
set -u
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: bench/gpu.sh OUT_DIR [--quick]" >&2
  exit 2
fi
OUT=$1
QUICK=0
[[ ${2:-} == --quick ]] && QUICK=1
if [[ ! -f bench/gpu.sh || ! -d meta_mask ]]; then
  echo "bench/gpu.sh: run it from the repository root (where meta_mask/ and bench/ are)" >&2
  exit 2
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/meta_mask_jax}"
BUDGET_S=290  # all steps together; the rest of the 5 minutes is start-up and bookkeeping
START=$(date +%s)
STEPS_TSV="$OUT/.steps.tsv"
: >"$STEPS_TSV"
FIRST_FAILURE=0

# run NAME MAX_SECONDS CMD...: run CMD under min(MAX_SECONDS, budget left), log to OUT/NAME.log.
run() {
  local name=$1 max=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  local limit=$((max < left ? max : left))
  local t0 rc
  t0=$(date +%s.%N)
  if ((limit < 5)); then
    rc=124
    echo "skipped: the 5-minute budget is spent" >"$OUT/$name.log"
  else
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
  fi
  local secs
  secs=$(python -c "import time; print(round(time.time() - $t0, 1))")
  local timed_out=false
  [[ $rc == 124 || $rc == 137 ]] && timed_out=true
  echo "[gpu.sh] $name: exit $rc, ${secs} s (limit ${limit} s)" >&2
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" "$timed_out" >>"$STEPS_TSV"
  if [[ $rc != 0 && $FIRST_FAILURE == 0 ]]; then FIRST_FAILURE=$rc; fi
}

run devices 60 python - "$OUT/devices.json" <<'EOF'
import json, shutil, subprocess, sys
import jax
info = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__}
if shutil.which("nvidia-smi"):
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(info)
EOF

run parity 90 python -m pytest tests/model/test_bart.py -q -x -k "logits_match_torch" \
  -p no:cacheprovider --junitxml="$OUT/parity.xml"

if ((QUICK)); then
  SIZES=(--quick --peak_n=256)
  FLAGS=experiments/world_quick.flags
else
  SIZES=(--d_model=768 --heads=12 --ffn_dim=3072 --layers=6 --vocab=50265 --seq=512 --batch=8
    --peak_n=8192 --repeats=5 --iters=5)
  FLAGS=experiments/world.flags
fi
run bench_bf16 120 python -m bench --sections=train --no_torch --dtype=bfloat16 "${SIZES[@]}" \
  --out="$OUT/bench_bf16.json"

rm -rf "$OUT/world"  # a finished run is never overwritten: start fresh
run world 240 python -m meta_mask.train --flagfile="$FLAGS" --workdir="$OUT/world"

python - "$OUT" "$QUICK" "$START" <<'EOF'
import glob, json, os, sys, time
out, quick, start = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
steps = {}
for line in open(os.path.join(out, ".steps.tsv")):
    name, rc, secs, limit, timed_out = line.rstrip("\n").split("\t")
    steps[name] = {"exit_code": int(rc), "seconds": float(secs), "limit_s": int(limit),
                   "timed_out": timed_out == "true", "log": f"{name}.log"}
summary = {"quick": quick, "total_s": round(time.time() - start, 1), "steps": steps}
bench = os.path.join(out, "bench_bf16.json")
if os.path.exists(bench):
    res = json.load(open(bench))
    a, m = res["train_vs_torch"], res["mfu"]
    summary["bench_bf16"] = {"ms_per_step": a["ours_s"] * 1e3, "tokens_per_s": a["ours_tokens_per_s"],
                             "mfu": m["mfu"], "peak_flops_per_s": m["peak_flops_per_s"],
                             "devices": res["machine"]["devices"]}
summary["world_results"] = sorted(
    os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "world", "**", "results.json"),
                                               recursive=True))
json.dump(summary, open(os.path.join(out, "gpu.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
EOF
rm -f "$STEPS_TSV"
exit "$FIRST_FAILURE"
