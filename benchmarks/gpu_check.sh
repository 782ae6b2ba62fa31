#!/usr/bin/env bash
# The GPU check: everything that needs a GPU to be measured, in runs that fit a lent
# machine's time (docs/gpus.md). In order, each step under its own time limit, so one
# that fails or overruns costs only itself:
#   1. the device, and the CUDA-only tests;
#   2. the whole pipeline on the `fashion-mnist-gpu` preset: first its estimated time on an
#      H100 (from the preset's steps), then wall time, training seconds per model, the
#      report's metrics (sample FID: domain features, no rejection);
#   3. the sampler at the imagenet-256 paper widths (benchmarks/bench_sampling.py);
#   4. activation checkpointing on the paper's bottom prior (benchmarks/bench_memory.py);
#   5. bf16 and channels_last against fp32 (benchmarks/bench_precision.py).
# Prints a summary at the end, with one line per goal: met, not met or not run. The log,
# the summary, the report and its sample grid go to --out.
#
#   bash benchmarks/gpu_check.sh --out DIR             # on a GPU machine (all steps: over 10 minutes)
#   bash benchmarks/gpu_check.sh --dry-run --out DIR   # the same steps at tiny sizes on a CPU
#   bash benchmarks/gpu_check.sh --steps pipeline --out DIR              # one device call
#   bash benchmarks/gpu_check.sh --steps cuda_tests,sampling --out DIR   # another
#
# --budget (seconds, default 560) bounds the whole check: the pipeline gets what is left
# after the limits of the other steps chosen.
#
# A bare machine (Python and torch, nothing else) needs the other dependencies as wheels
# in .whl/ (installed into a temporary folder first) and may take Fashion-MNIST's IDX
# files xz-compressed from .gpudata/ (else the Debian package's are used); both come from
# benchmarks/gpu_bundle.sh.
set -uo pipefail

dry=0
only=""  # --steps a,b: only these steps (setup always runs)
out=gpu-check-out
budget=560  # seconds for the whole check; the pipeline gets what the other steps leave
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1 ;;
    --out) out=$2; shift ;;
    --budget) budget=$2; shift ;;
    --steps) only=",$2,"; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
log=$out/gpu_check.log
summary=$out/summary.txt
: > "$log"
: > "$summary"
exec > >(tee -a "$log") 2>&1

work=$(mktemp -d /tmp/vqvae2-gpu-check.XXXXXX)
# The pipeline's root and Prefect's home: what matters was copied to --out.
trap 'rm -rf "$work"' EXIT
: > "$work/steps"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PREFECT_HOME=${PREFECT_HOME:-$work/prefect-home}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-180}

if [ $dry = 1 ]; then device=cpu; else device=cuda; fi

# Each step's limit (seconds); the pipeline's is what the budget leaves.
declare -A limit=([cuda_tests]=60 [sampling]=$(( dry ? 120 : 100 )) [memory]=60 [precision]=$(( dry ? 60 : 40 )))

chosen() { [ -z "$only" ] || [ "$1" = setup ] || [[ $only == *",$1,"* ]]; }

step() {  # step NAME LIMIT: run the function NAME under a time limit; its outcome goes to the summary
  local name=$1 limit=$2 started=$SECONDS rc outcome
  chosen "$name" || return 0
  echo
  echo "=== $name (at most ${limit}s)"
  if [ "$limit" = none ]; then "$name"; else timeout --kill-after=15 "$limit" bash -c "$name"; fi
  rc=$?
  case $rc in 0) outcome=ok ;; 124|137) outcome="TIMED OUT" ;; *) outcome="failed ($rc)" ;; esac
  printf '%-26s %-12s %5d s\n' "$name" "$outcome" $((SECONDS - started)) >> "$work/steps"
  return $rc
}

setup() {
  local started=$EPOCHREALTIME
  if [ -d .whl ] && ! python3 -c "import prefect, zarr, webdataset, torch_fidelity" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" .whl/*.whl \
      || return 1
    export PYTHONPATH="$PYTHONPATH:$work/site"
    installed=$(ls .whl/*.whl | wc -l)
  fi
  if ls .gpudata/*.xz >/dev/null 2>&1; then
    mkdir -p "$work/fashion-mnist"
    local pids=() f
    for f in .gpudata/*.xz; do
      python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$f" "$work/fashion-mnist/$(basename "$f" .xz)" & pids+=($!)
    done
    wait "${pids[@]}"  # not a bare `wait`: that would wait for the log's tee too
  fi
  python3 - <<'EOF' || return 1
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
import prefect, zarr, webdataset, torch_fidelity  # the pipeline's dependencies, importable
print(f"prefect {prefect.__version__}, zarr {zarr.__version__}")
EOF
  # The install's goal counts what a bare machine waits for: the wheels, the data and the
  # first imports (which compile the wheels' modules: they were installed --no-compile).
  if [ -n "${installed:-}" ]; then
    echo "installed $installed wheels in $(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" \
      "$started" "$EPOCHREALTIME") s" | tee "$work/install"
  fi
}

cuda_tests() {
  set -o pipefail  # a step runs in a shell of its own
  # Only the modules that mark tests `cuda`: collecting the whole suite imports every test
  # module, which takes longer than the CUDA tests themselves.
  local modules
  modules=$(grep -l "mark\.cuda" tests/test_*.py) || { echo "no module marks a test cuda" >&2; return 1; }
  python3 -m pytest -q -p no:cacheprovider -m cuda $modules 2>&1 | tee "$work/cuda_tests"
}

estimate() {  # the pipeline's time on one H100, from the preset's own steps
  python3 benchmarks/gpu_estimate.py --json "$work/estimate.json"
}

pipeline() {
  set -o pipefail
  local config=$work/config.json root=$work/root
  estimate || return 1
  python3 - "$config" "$dry" "$work/fashion-mnist" <<'EOF'
import json, os, sys
path, dry, data = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
config = {"preset": "fashion-mnist-gpu", "overrides": {}}
if os.path.isdir(data):
    config["source"] = {"kind": "fashion-mnist", "url": data}
if dry:  # the preset's stages and shapes at a CPU's size
    tiny = {"channels": 16, "res_channels": 8}
    config["overrides"] = {
        **{f"autoencoder.{k}": v for k, v in tiny.items()},
        **{f"priors.{i}.{k}": v for i in (0, 1) for k, v in {"channels": 16, "layers": 2, "embed_dim": 8}.items()},
        "priors.1.cond_channels": 16, "priors.1.cond_res_blocks": 1, "classifier.widths": [8, 16, 32],
        **{f"{t}.{k}": v for t in ("train_autoencoder", "train_prior", "train_classifier")
           for k, v in {"steps": 6, "batch_size": 16, "warmup_steps": 0}.items()},
    }
    config["ingest"] = {"max_samples_per_split": 400}
    config["sample"] = {"num_samples": 10, "batch_size": 25}
    config["evaluate"] = {"eval_images": 64, "grid_size": 16}
json.dump(config, open(path, "w"), indent=1)
EOF
  local started=$SECONDS
  python3 -m flows.cli run --config "$config" --root "$root" || return 1
  echo "pipeline wall time: $((SECONDS - started)) s" | tee -a "$work/pipeline"
  python3 - "$root" "$out" "$work" "$dry" "$((SECONDS - started))" <<'EOF' | tee -a "$work/pipeline"
import glob, json, os, shutil, sys
root, out, work, dry, wall = sys.argv[1:]
estimate = json.load(open(f"{work}/estimate.json"))["stages"]
for path in sorted(glob.glob(f"{root}/*/*/manifest.json")):
    m = json.load(open(path))
    if "device" in m:
        stage = m.get("directory") or m.get("stage")  # manifests written before name it `stage`
        which = m.get("role") or (f"level {m['level']}" if "level" in m else "")
        guess = estimate.get(f"{stage} {which}".strip())
        versus = f" (estimated {guess:.0f} s)" if guess and dry != "1" else ""
        print(f"  trained {stage:<12} {which:<9} {m['seconds']:7.1f} s on {m['device']}, {m['steps']} steps{versus}")
figures = {"wall_s": int(wall)}
for path in glob.glob(f"{root}/reports/*/manifest.json"):
    report = os.path.dirname(path)
    manifest = json.load(open(path))
    metrics = manifest["metrics"]
    figures.update(fid=metrics.get("sample_fid"), extractor=manifest.get("extractor"))
    print(f"  features                   {manifest.get('extractor')}")
    for name in ("sample_fid", "sample_kid_mean", "sample_isc_mean", "recon_psnr_db", "codes_used_top",
                 "codes_used_bottom", "nll_bits_per_code_top", "nll_bits_per_code_bottom"):
        if name in metrics:
            print(f"  {name:<26} {metrics[name]:.4g}")
    for name in ("report.md", "samples.png"):
        shutil.copy(os.path.join(report, name), os.path.join(out, name))
json.dump(figures, open(f"{work}/pipeline.json", "w"))
EOF
}

sampling() {
  set -o pipefail
  if [ $dry = 1 ]; then
    # One thread: a CPU that other jobs share slows many threads far more than one.
    python3 benchmarks/bench_sampling.py --device cpu --threads 1 --widths tiny --batches 1,2
  else
    python3 benchmarks/bench_sampling.py --device cuda --widths paper --batches 16,128
  fi 2>&1 | tee "$work/sampling"
}

memory() {
  if [ $dry = 1 ]; then  # the smoke preset's bottom prior: the same code paths, seconds on a CPU
    python3 benchmarks/bench_memory.py --device cpu --preset smoke --channels 16 --micro-batch 2 --steps 1 --models prior
  else
    python3 benchmarks/bench_memory.py --device cuda --channels 0 --micro-batch 32 --dtype bf16 --steps 3 --models prior
  fi
}

precision() {
  if [ $dry = 1 ]; then
    python3 benchmarks/bench_precision.py --device cpu --preset smoke --batch 8 --steps 1 --warmup 1
  else
    python3 benchmarks/bench_precision.py --device cuda --steps 20 &&
      python3 benchmarks/bench_precision.py --device cuda --preset imagenet-256 --models autoencoder --batch 32 --steps 10
  fi
}

goals() {  # one line per goal: met, not met or not run, and the figure it was judged on
  python3 benchmarks/gpu_goals.py "$work" $([ $dry = 1 ] && echo --dry-run) --chosen "$only" \
    --pipeline-limit "${limit[pipeline]}"
}

export -f cuda_tests estimate pipeline sampling memory precision
export work out dry
started=$SECONDS
step setup none || { echo "gpu_check.sh: setup failed: see $log" >&2; exit 1; }
step cuda_tests "${limit[cuda_tests]}"
after_pipeline=0
for name in sampling memory precision; do
  if chosen $name; then after_pipeline=$((after_pipeline + ${limit[$name]})); fi
done
left=$(( budget - (SECONDS - started) - after_pipeline ))
limit[pipeline]=$(( left > 60 ? left : 60 ))
step pipeline "${limit[pipeline]}"
step sampling "${limit[sampling]}"
step memory "${limit[memory]}"
step precision "${limit[precision]}"

{
  echo "gpu_check ($([ $dry = 1 ] && echo "dry run, CPU" || echo "$device")) in $((SECONDS - started)) s"
  cat "$work/steps"
  echo
  cat "$work/pipeline" 2>/dev/null
  echo
  goals
} > "$summary"
echo
echo "=== summary"
cat "$summary"
grep -q -v ' ok ' "$work/steps" && exit 1 || exit 0
