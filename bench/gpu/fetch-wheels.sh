#!/usr/bin/env bash
# Run in the project checkout on the CPU machine, before a device call: downloads the Python 3.12 wheels that the
# GPU machine lacks (it has torch, numpy, scipy, matplotlib, tqdm, pyyaml, pytest, pillow) into ./.whl (git-ignored
# via .gitignore). SimpleITK (53 MB) is left out: only NRRD/MHA inputs need it, and it would not fit the
# 64 MiB that travels. Name .whl in the device call's carry list; bench/gpu itself is tracked and travels.
#   bash bench/gpu/fetch-wheels.sh
set -euo pipefail
mkdir -p .whl
for p in monai nibabel pydicom highdicom pyjpegls pynrrd pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg pylibjpeg-rle; do
  v=$(python3 -c "import importlib.metadata as m; print(m.version('$p'))" 2>/dev/null || true)
  get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$1"; }
  get "$p${v:+==$v}" 2>/dev/null || get "$p"   # the local version may have no Python 3.12 wheel: take the newest
done
du -sh .whl
