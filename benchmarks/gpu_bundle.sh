#!/usr/bin/env bash
# What benchmarks/gpu_check.sh needs on a bare, offline GPU machine (Python 3.12 and torch):
# the wheels of benchmarks/gpu_wheels.txt in .whl/ and Fashion-MNIST's IDX files, xz-compressed,
# in .gpudata/ (both git-ignored). Together they must stay under 60 MiB: the device tool carries
# at most 64 MiB, the checkout included.
#
#   bash benchmarks/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
# Only the pins not yet in .whl/ are downloaded (a packed wheel no longer has the index's
# hash, so pip would fetch it again), and wheels no pin names are removed: gpu_check.sh
# installs every wheel there, and two versions of one package stop the install.
mkdir -p .whl
missing=$(mktemp) trial=$(mktemp -d)
trap 'rm -rf "$missing" "$trial" .whl/.download' EXIT
python3 - benchmarks/gpu_wheels.txt "$missing" <<'EOF'
import glob, os, re, sys


def key(name, version):
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"


pins = {}
for line in open(sys.argv[1]):
    pin = line.split("#")[0].strip()
    if "==" in pin:
        pins[key(*pin.split("=="))] = pin
have = set()
for path in glob.glob(".whl/*.whl"):
    found = key(*os.path.basename(path).split("-")[:2])
    if found in pins:
        have.add(found)
    else:
        os.remove(path)
with open(sys.argv[2], "w") as missing:
    missing.writelines(f"{pin}\n" for found, pin in pins.items() if found not in have)
EOF
if [ -s "$missing" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl/.download -r "$missing"
  # Deflated as published, the wheels come to 36 MiB and the bundle to 61; the same files
  # LZMA-compressed come to 30. pip unpacks any method Python's zipfile reads, and a wheel's
  # RECORD hashes the files it installs, not the archive, so the wheel installs the same files.
  python3 - .whl/.download/*.whl <<'EOF'
import os, sys, zipfile

for path in sys.argv[1:]:
    packed = os.path.join(".whl", os.path.basename(path))
    with zipfile.ZipFile(path) as wheel, zipfile.ZipFile(packed + ".part", "w", zipfile.ZIP_LZMA) as out:
        for entry in wheel.infolist():
            out.writestr(entry, wheel.read(entry), compress_type=zipfile.ZIP_LZMA)
    os.replace(packed + ".part", packed)
EOF
fi
mkdir -p .gpudata
for f in /usr/share/datasets/fashion-mnist/*-ubyte.gz; do
  out=.gpudata/$(basename "$f" .gz).xz
  [ -s "$out" ] || zcat "$f" | xz -9e -T0 > "$out"
done
# As gpu_check.sh's goal counts it (benchmarks/gpu_goals.py): the files it reads.
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; from gpu_goals import bundle
print(f'bundle: {bundle(Path(\".\"))}')"
# A trial install, as gpu_check.sh installs on the GPU machine (for its Python 3.12): a wheel
# pip cannot read fails here, and the time bounds a bare machine's (its data and first
# imports aside).
started=$EPOCHREALTIME
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-requires-python \
  --only-binary=:all: --python-version 3.12 --implementation cp --target "$trial" .whl/*.whl 2>&1 | { grep -v "^WARNING" || true; }
python3 -c "import sys; print(f'trial install of the wheels: {float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" \
  "$started" "$EPOCHREALTIME"
