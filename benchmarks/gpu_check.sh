#!/usr/bin/env bash
# GPU check in one go (under 5 minutes): kernel parity and timing, and the TensorRT and DALI GPU
# tests where those libraries are installed. Installs nothing; needs python3 with numpy, CuPy and
# cuda-python for the kernels (pytest too for the test files; without it only the benchmark's
# own parity check runs). Writes gpu_check.json (summary) plus one log per step to $OUT if set,
# else benchmarks/results/. Exit status: 0 when nothing failed (skips are not failures).
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
RESULTS=${OUT:-$REPO/benchmarks/results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export CXR_KERNEL_CACHE=${CXR_KERNEL_CACHE:-${TMPDIR:-/tmp}/cxr-kernel-cache}
BUDGET_S=${GPU_CHECK_BUDGET_S:-285}
START=$(date +%s)
STEPS="$RESULTS/.gpu_check_steps.jsonl"
: >"$STEPS"

has() { "$PY" -c "import $1" >/dev/null 2>&1; }
has_cuda_python() { "$PY" -c "from engine.runtime.cuda import bindings; bindings()" >/dev/null 2>&1; }

record() { # name status rc seconds reason
  "$PY" - "$@" >>"$STEPS" <<'EOF'
import json, sys
name, status, rc, seconds, reason = sys.argv[1:6]
print(json.dumps({"step": name, "status": status, "rc": int(rc), "seconds": float(seconds),
                  "reason": reason or None, "log": f"{name}.log"}))
EOF
}

step() { # name command...: runs with what is left of the budget
  local name=$1
  shift
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    record "$name" skipped 0 0 "time budget of ${BUDGET_S}s used up"
    return
  fi
  local t0 rc
  t0=$(date +%s)
  timeout "$left" "$@" >"$RESULTS/$name.log" 2>&1
  rc=$?
  local status=passed
  [ "$rc" -ne 0 ] && status=failed
  [ "$rc" -eq 124 ] && status=timeout
  # pytest exit 5: nothing collected/selected (e.g. every test skipped by its marker)
  [ "$rc" -eq 5 ] && status=skipped
  record "$name" "$status" "$rc" "$(($(date +%s) - t0))" ""
  tail -n 3 "$RESULTS/$name.log"
}

skip() { record "$1" skipped 0 0 "$2"; echo "$1: skipped ($2)"; }

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    >"$RESULTS/nvidia-smi.log" 2>&1
else
  echo "no nvidia-smi" >"$RESULTS/nvidia-smi.log"
fi

PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rs)

# 1. kernels: NVRTC vs kernels/reference.py (real masks and CXRs, odd sizes, empty/full, batch 1/64)
if ! has numpy || ! has cupy || ! has_cuda_python; then
  skip kernels_parity "needs numpy, CuPy and cuda-python"
  skip kernels_timing "needs numpy, CuPy and cuda-python"
else
  if has pytest; then
    step kernels_parity "${PYTEST[@]}" tests/test_kernels_gpu.py --junitxml="$RESULTS/kernels_parity.xml"
  else
    skip kernels_parity "pytest is not installed (kernels_timing still checks parity)"
  fi
  step kernels_timing "$PY" benchmarks/kernels_gpu.py --batch 64 --out "$RESULTS/kernels_gpu.json"
fi

# 2. TensorRT: build tiny plans, run them, parity with ONNX Runtime (needs the repo's deps)
if "$PY" -c "import tensorrt; tensorrt.Builder" >/dev/null 2>&1 && has pytest && has onnx && has onnxruntime && has typer && has rich; then
  step tensorrt "${PYTEST[@]}" -m gpu tests/runtime/test_tensorrt.py --junitxml="$RESULTS/tensorrt.xml"
else
  skip tensorrt "needs tensorrt, pytest, onnx, onnxruntime, typer and rich"
fi

# 3. DALI on the GPU (decode and preprocess, and its device output handed on without a host
#    copy): the gpu-marked tests of the pipeline and of the device batches
if has nvidia.dali && has pytest && [ -f tests/test_pipeline.py ]; then
  DALI_TESTS=(tests/test_pipeline.py)
  if has onnxruntime && has polars && has usearch && has_cuda_python; then
    DALI_TESTS+=(tests/stages/test_device_batch.py)
  fi
  step dali "${PYTEST[@]}" -m gpu "${DALI_TESTS[@]}" --junitxml="$RESULTS/dali.xml"
else
  skip dali "needs nvidia-dali and pytest"
fi

"$PY" - "$RESULTS" "$STEPS" "$START" <<'EOF'
import json, os, platform, sys, time
results, steps_file, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
import xml.etree.ElementTree as ET

steps = [json.loads(line) for line in open(steps_file) if line.strip()]
for s in steps:  # pytest steps: counts from their JUnit XML; all skipped -> "skipped"
    xml = os.path.join(results, s["step"] + ".xml")
    if os.path.exists(xml):
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        s["tests"] = counts
        if s["status"] == "passed" and counts["tests"] == counts["skipped"]:
            s["status"] = "skipped"
            s["reason"] = "every test skipped itself (see the log for why)"
summary = {
    "check": "gpu_check",
    "host": platform.node(),
    "gpu": open(os.path.join(results, "nvidia-smi.log")).read().strip(),
    "wall_s": time.time() - start,
    "steps": steps,
    "ok": not any(s["status"] in ("failed", "timeout") for s in steps),
}
kernels = os.path.join(results, "kernels_gpu.json")
if os.path.exists(kernels):
    summary["kernels"] = json.load(open(kernels))
open(os.path.join(results, "gpu_check.json"), "w").write(json.dumps(summary, indent=2) + "\n")
os.remove(steps_file)
print(json.dumps({k: summary[k] for k in ("gpu", "wall_s", "steps", "ok")}, indent=2))
sys.exit(0 if summary["ok"] else 1)
EOF
