#!/usr/bin/env bash
# What benchmarks/gpu_check.sh needs on a bare, offline GPU machine (Python 3.12 and torch):
# the wheels of benchmarks/gpu_wheels.txt in .whl/ and Fashion-MNIST's IDX files, xz-compressed,
# in .gpudata/ (both git-ignored; about 62 MiB together, under the device tool's 64 MiB).
#
#   bash benchmarks/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl -r benchmarks/gpu_wheels.txt
mkdir -p .gpudata
for f in /usr/share/datasets/fashion-mnist/*-ubyte.gz; do
  out=.gpudata/$(basename "$f" .gz).xz
  [ -s "$out" ] || zcat "$f" | xz -9e -T0 > "$out"
done
du -sh .whl .gpudata
