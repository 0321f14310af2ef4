#!/usr/bin/env bash
# Reproduce the tables of docs/performance.md in one command (2-3 hours on 2 cores, ~20 GB):
#
#     bash benchmarks/reproduce.sh MODELS_DIR [WORK_DIR]
#
# MODELS_DIR: a trained models directory with FP32 exports (what `cxr train` writes; the shipped
# engine/shipped_models stores float16 weights and computes in float32, the same speed). Archives are
# made once into WORK_DIR (default /tmp/cxr-perf) from ../shared/data/cxr-dev (CXR_DATA
# overrides); every benchmark appends JSON lines to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${1:?usage: bash benchmarks/reproduce.sh MODELS_DIR [WORK_DIR]}
WORK=${2:-/tmp/cxr-perf}
DATA=${CXR_DATA:-../shared/data/cxr-dev}
PY=${PYTHON:-python}

make() {  # make OUT ARGS...: an archive, unless it is already complete
  local out=$1
  shift
  [ -f "$out/archive.json" ] || "$PY" -m benchmarks.make_archive --out "$out" "$@"
}
make "$WORK/jpeg2000" --count 2000 --formats jpeg
make "$WORK/devjpeg" --count 288 --formats jpeg --source "$DATA/images" --labels "$DATA/labels.csv"
make "$WORK/png500" --count 500 --formats png16
make "$WORK/dicom500" --count 500 --formats dicom
make "$WORK/mem2000" --count 2000 --formats jpeg --long-side 1024-1536
make "$WORK/mem20000" --count 20000 --formats jpeg --long-side 1024-1536 --seed 1

# fp32 and int8: `--precision auto` runs the INT8 exports on VNNI/AMX CPUs (where their parity
# holds), so the int8 rows are the default there and the fp32 rows elsewhere
bench() { "$PY" -m benchmarks.bench_screen --models "$MODELS" --precision fp32,int8 \
  --batch-size 16 --naive-limit 100 "$@"; }
# 1. 2048-3000 px JPEGs; decoder agreement on the dev images re-encoded as such JPEGs
bench --archive "$WORK/jpeg2000" --decoder dali,pillow,pillow-draft \
  --dev-images "$WORK/devjpeg/jpeg" --labels "$WORK/devjpeg/labels.csv"
# 2. 16-bit PNG and DICOM (MONOCHROME1/2), agreement on the real dev images; `auto` is the
#    engine's own default (Pillow), each decoder with one decode worker and with the default
bench --archive "$WORK/png500" --decoder dali,auto --decode-workers 1,0
bench --archive "$WORK/dicom500" --decoder dali,auto --decode-workers 1,0
# 3. memory: peak RSS of the whole harness (null backend) at 2000 and 20 000 images
for n in 2000 20000; do
  bench --archive "$WORK/mem$n" --configs null --decoder pillow-draft,dali --no-quality
done
# 4. the similarity index at 10^5 and 10^6 vectors, and `cxr similar` latency
"$PY" -m benchmarks.bench_usearch --sizes 100000,1000000 --connectivity 16 --models "$MODELS"
# 5. start-up of a small run (5 images), with and without the saved optimised ORT graphs
"$PY" -m benchmarks.bench_startup --images examples --repeats 7
