"""Image backbones by name, torchvision's or timm's, with a fresh classifier head for our classes.

A name torchvision lists as an image classifier (mobilenet_v2, resnet18, efficientnet_b0,
convnext_tiny…) builds torchvision's model, as checkpoints made before timm came in expect;
any other name, or one prefixed `timm:` (`timm:convnext_tiny`), goes to `timm.create_model`,
pretrained tags included (`vit_small_patch14_dinov2.lvd142m`). timm is imported only then.

`--weights imagenet` looks in the local caches (torch's; for timm also Hugging Face's), tries one
download when the host answers, then takes the file an offline package ships (see
`museum.image.weights`), else stops with one line. Each backbone comes with its preprocessing
(mean/std, interpolation, crop: `museum.image.preprocess`), which `ImageModel` keeps in its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from museum.errors import MuseumError
from museum.image import weights as weight_files
from museum.image.preprocess import IMAGENET_MEAN, IMAGENET_STD, timm_preprocess, torchvision_preprocess
from museum.log import logger
from museum.torchutil import device_of

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Backbone", "build_backbone", "create_backbone", "backbone_preprocess",
           "check_input_size", "head_parameter_names", "last_linear", "stage_extractor"]

TIMM_PREFIX = "timm:"
OFFLINE_PACKAGE, OFFLINE_FILE = weight_files.PACKAGED["mobilenet_v2"][:2]  # torchvision's MobileNet_V2 IMAGENET1K_V1


@dataclass
class Backbone:
    """A classifier network with `n_classes` outputs, where its weights came from, and its preprocessing."""

    module: nn.Module
    source: str
    preprocess: dict  # preprocess.FIELDS of its pretrained weights
    library: str  # "torchvision" | "timm"


def list_backbones() -> list[str]:
    """torchvision's classifier names; any timm model name (`timm.list_models()`) works as well."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def backbone_library(name: str) -> str:
    """Which library builds `name`, or one MuseumError line when neither knows it."""
    if not name.startswith(TIMM_PREFIX) and name in torchvision.models.list_models(module=torchvision.models):
        return "torchvision"  # classifiers only, no detectors
    import timm

    arch = name.removeprefix(TIMM_PREFIX)
    if timm.is_model(arch):
        try:
            timm.models.get_pretrained_cfg(arch)  # a wrong pretrained tag is an error here, not at download time
        except RuntimeError as exc:
            raise MuseumError(f"--backbone {name}: {exc} See timm.list_pretrained('{arch.split('.')[0]}*')") from None
        return "timm"
    raise MuseumError(f"--backbone {name}: not a torchvision image classifier nor a timm model; choose one such as "
                      "mobilenet_v2, resnet18, efficientnet_b0, tf_efficientnet_lite0, convnext_tiny")


def backbone_preprocess(name: str) -> dict:
    """The preprocessing of `name`'s pretrained weights, without building the network."""
    if backbone_library(name) == "torchvision":
        return torchvision_preprocess(name)
    import timm

    cfg = timm.models.get_pretrained_cfg(name.removeprefix(TIMM_PREFIX))
    return timm_preprocess(pretrained_cfg=cfg.to_dict() if cfg else {})


def _classifier_name(model: nn.Module) -> str | None:
    """Qualified name of the classifier Linear layer: timm's pretrained config names it; else the last Linear."""
    cfg = getattr(model, "pretrained_cfg", None)
    named = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(named, str):
        try:
            if isinstance(model.get_submodule(named), nn.Linear):
                return named
        except AttributeError:
            pass
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def last_linear(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the classifier Linear layer."""
    last = _classifier_name(model)
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
    last = _classifier_name(model)
    return {f"{last}.{p}" for p, _ in model.get_submodule(last).named_parameters()} if last else set()


# ----------------------------------------------------------------------------- weights

def offline_mobilenet_file() -> Path | None:
    """The MobileNetV2 ImageNet file shipped by the offline weights package, if installed."""
    return weight_files.package_file(OFFLINE_PACKAGE, OFFLINE_FILE)


_online = weight_files.online
_load_file = weight_files.load_state_file


def imagenet_state_dict(backbone: str) -> tuple[dict, str]:
    """(ImageNet state dict of torchvision's `backbone`, where it came from) or one `MuseumError` line."""
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
    raise weight_files.no_weights_error(backbone, str(hub_dir), enum.DEFAULT.url)


def _build_torchvision(name: str, n_classes: int, weights: str) -> Backbone:
    # GoogLeNet and Inception v3 return a tuple with auxiliary logits while training; one output is enough here.
    extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **extra)
    source = "random initialisation"
    if weights == "imagenet":
        state, source = imagenet_state_dict(name)
    elif weights != "none":
        state, source = _load_file(_weights_path(weights)), weights
    if weights != "none":
        own = model.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if len(usable) < len(own) // 2:
            raise MuseumError(f"--weights {weights}: only {len(usable)} of {len(own)} tensors fit {name}; "
                              "is it a state dict of this backbone?")
        model.load_state_dict(usable, strict=False)
    _replace_head(model, n_classes)
    return Backbone(model, source, torchvision_preprocess(name), "torchvision")


def _weights_path(weights: str) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise MuseumError(f"--weights {weights}: no such file; pass imagenet, none or a .pth state dict")
    return path


def _timm_imagenet(arch: str, cfg, download: bool = True) -> tuple[dict, str]:
    """(pretrained_cfg_overlay for timm.create_model, where the weights come from) for `--weights imagenet`;
    an empty overlay means: download (the host answered)."""
    if cfg is None or not (cfg.hf_hub_id or cfg.url or weight_files.packaged_file(arch)):
        raise MuseumError(f"--backbone {arch}: timm has no pretrained weights for it; pass --weights none")
    cached = weight_files.cached_timm_file(cfg)
    if cached is not None:
        return {"file": str(cached)}, f"local cache {cached}"
    remote = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
    if download and _online(remote):
        return {}, remote  # timm downloads into the Hugging Face (or torch hub) cache
    packaged = weight_files.packaged_file(arch)
    if packaged is not None:
        return {"state_dict": _load_file(packaged)}, f"offline package file {packaged}"
    where = f"{weight_files.hf_cache_dir()} or {Path(torch.hub.get_dir()) / 'checkpoints'}"
    raise weight_files.no_weights_error(arch, where, remote)


def _small_head(model: nn.Module) -> nn.Module:
    """Start a timm model's new classifier as torchvision's MobileNetV2 starts its own: N(0, 0.01), bias 0.

    timm initialises some heads for training from scratch: EfficientNet's uniform ±1/√classes gave
    logits of std 2.2 on ImageNet features (MobileNetV2's 0.15), a first-epoch training loss near 4.6
    for 5 classes, and tf_efficientnet_lite0 0.64 macro-F1 on quintuplets where MobileNetV2 reached 0.91."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Module):
        for layer in head.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(layer.weight, 0.0, 0.01)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
    return model


def _build_timm(name: str, n_classes: int, weights: str, input_size: int | None) -> Backbone:
    import timm

    arch = name.removeprefix(TIMM_PREFIX)
    cfg = timm.models.get_pretrained_cfg(arch)
    # A fixed-size model (ViT, Swin) is built at the training size; timm resamples its position embedding.
    size_kwargs = {"img_size": int(input_size)} if input_size and cfg is not None and cfg.fixed_input_size else {}
    overlay, source = None, "random initialisation"
    if weights == "imagenet":
        overlay, source = _timm_imagenet(arch, cfg)
    elif weights != "none":
        overlay, source = {"state_dict": _load_file(_weights_path(weights))}, weights

    def create(**kwargs) -> nn.Module:
        try:
            return _small_head(timm.create_model(arch, num_classes=n_classes, **size_kwargs, **kwargs))
        except TypeError as exc:
            if not size_kwargs:
                raise MuseumError(f"--backbone {name}: timm cannot build it ({exc})") from None
            size_kwargs.clear()  # this family takes no img_size: check_input_size tells what it takes
            return create(**kwargs)
        except (RuntimeError, OSError, ValueError) as exc:  # a broken cached file, a failed download
            raise MuseumError(f"--weights {weights}: could not load {arch}'s weights from {source} "
                              f"({str(exc).strip().splitlines()[0][:160]}); pass another file or --weights none") from None

    if overlay == {}:
        try:
            model = create(pretrained=True)
            return Backbone(model, source, timm_preprocess(model), "timm")
        except MuseumError as exc:  # a failed download falls through to the offline copy
            logger.warning(f"download of {source} failed ({exc})")
            overlay, source = _timm_imagenet(arch, cfg, download=False)
    state = overlay.pop("state_dict", None) if overlay is not None else None
    if overlay is None or state is not None:
        model = create(pretrained=False)
        if state is not None:  # a user's or a packaged file: checked tensor by tensor, the head stays fresh
            head = frozenset(head_parameter_names(model))
            own = model.state_dict()
            fitted = weight_files.fit_state_dict(state, own, head, f"--weights {source}")
            model.load_state_dict({**{k: own[k] for k in head}, **fitted})
    else:  # timm's own loader: checkpoint filters, position-embedding resampling, classifier adaptation
        model = create(pretrained=True, pretrained_cfg_overlay=overlay)
    return Backbone(model, source, timm_preprocess(model), "timm")


def create_backbone(name: str, n_classes: int, weights: str = "imagenet", input_size: int | None = None) -> Backbone:
    """Backbone `name` with a fresh `n_classes` head; `weights` is imagenet, none or a state-dict file.

    `input_size` builds fixed-size timm models (ViT…) for that size; other networks take any size."""
    if backbone_library(name) == "torchvision":
        return _build_torchvision(name, n_classes, weights)
    return _build_timm(name, n_classes, weights, input_size)


def build_backbone(name: str, n_classes: int, weights: str = "imagenet", input_size: int | None = None) -> tuple[nn.Module, str]:
    """(model, description of where its weights came from): `create_backbone` without the preprocessing."""
    backbone = create_backbone(name, n_classes, weights, input_size)
    return backbone.module, backbone.source


def check_input_size(model: nn.Module, name: str, size: int) -> None:
    """One dry forward pass at `size` px: some classifiers (ViT, MaxViT) take only the size they were built for."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=device_of(model)))
    except (RuntimeError, ValueError, AssertionError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
        raise MuseumError(f"--backbone {name}: does not take {size} px inputs ({reason}); "
                          "pass --input-size 224, the size its ImageNet weights were made for") from None
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- stage features

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
    """[mean ; max] pooled outputs of chosen trunk stages + sqrt of an RGB colour histogram, in one vector.

    `trunk` is a torchvision `features` Sequential (`taps` index its blocks) or a whole timm model,
    whose `forward_intermediates` gives the outputs of its stages (`taps` index `feature_info`)."""

    def __init__(self, trunk: nn.Module, taps: list[int], mean, std, hist_bins: int = 4) -> None:
        super().__init__()
        self.trunk, self.taps, self.hist_bins = trunk, sorted(taps), hist_bins
        # Buffers, not parameters, and not saved: they come from the checkpoint's mean/std.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not isinstance(self.trunk, nn.Sequential):
            return self.trunk.forward_intermediates(x, indices=self.taps, intermediates_only=True, stop_early=True)
        outs = []
        for i, block in enumerate(self.trunk):
            x = block(x)
            if i in self.taps:
                outs.append(x)
            if i == self.taps[-1]:
                break
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.hist_bins
        bins = ((x * self.std + self.mean).clamp(0.0, 1.0) * (n - 1e-3)).long()
        cell = ((bins[:, 0] * n + bins[:, 1]) * n + bins[:, 2]).flatten(1)
        # x.shape[0], not len(x): a traced graph (museum export) keeps the batch size free
        hist = torch.zeros(x.shape[0], n ** 3, device=x.device, dtype=torch.float32)
        hist.scatter_add_(1, cell, torch.ones_like(cell, dtype=torch.float32))
        parts = [torch.cat([s.float().mean((2, 3)), s.float().amax((2, 3))], 1) for s in self.stages(x)]
        return torch.cat(parts + [(hist / cell.shape[1]).sqrt()], 1)


def stage_extractor(net: nn.Module, mean, std, stages: int = 5, hist_bins: int = 4) -> StageFeatures | None:
    """`StageFeatures` over the last `stages` stages of a torchvision `features` trunk or a timm model; None
    for a network with neither (torchvision's ResNets: use its pooled features)."""
    trunk = getattr(net, "features", None)
    if isinstance(trunk, nn.Sequential) and len(trunk) > 1:
        return StageFeatures(trunk, stage_ends(trunk)[-stages:], mean, std, hist_bins)
    info = getattr(net, "feature_info", None)
    if hasattr(net, "forward_intermediates") and info:
        n = len(info)
        return StageFeatures(net, list(range(max(0, n - stages), n)), mean, std, hist_bins)
    return None
