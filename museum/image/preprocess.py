"""How a backbone wants its pixels: mean/std, interpolation, crop and the size its weights were made at.

A timm backbone's comes from its pretrained config (`timm.data.resolve_model_data_config`),
a torchvision backbone's from its ImageNet weights' eval transform. `ImageModel` stores it in
every checkpoint (`meta()["preprocess"]`); a checkpoint written before it existed gets its
backbone's, with the mean/std it stored.

Fine-tuning, embedding and prediction decode each image once, squashed whole to the input size
with the weights' `interpolation` (see `museum.data.images`), so `crop_pct`/`crop_mode` only
describe how the ImageNet weights were evaluated, which `eval_tensor` reproduces (e.g. for
checking top-5 accuracy of a weight file). `resolve_input_size` picks the input size for the data.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from museum.data.images import RESAMPLE, probe_median_side

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FIELDS = ("pretrained_input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def timm_preprocess(model: torch.nn.Module | None = None, pretrained_cfg: dict | None = None) -> dict:
    """The data config the pretrained weights of a timm model (or of a pretrained config) expect."""
    from timm.data import resolve_data_config, resolve_model_data_config

    cfg = resolve_model_data_config(model) if model is not None else resolve_data_config({}, pretrained_cfg=pretrained_cfg or {})
    return {"pretrained_input_size": int(cfg["input_size"][-1]), "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]], "interpolation": str(cfg.get("interpolation", "bicubic")),
            "crop_pct": float(cfg.get("crop_pct", 0.875)), "crop_mode": str(cfg.get("crop_mode", "center"))}


def torchvision_preprocess(name: str) -> dict:
    """The eval transform of torchvision's default ImageNet weights for `name` (ImageNet defaults without any)."""
    import torchvision

    try:
        transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError):
        return {"pretrained_input_size": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center"}
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    return {"pretrained_input_size": int(crop), "mean": [float(v) for v in transform.mean],
            "std": [float(v) for v in transform.std],
            "interpolation": transform.interpolation.value, "crop_pct": round(crop / resize, 4), "crop_mode": "center"}


def eval_tensor(img: Image.Image, prep: dict, size: int | None = None) -> torch.Tensor:
    """uint8 (3, S, S) of an RGB image as the weights were evaluated: the shorter side resized to
    S / crop_pct with their interpolation, then the centre S × S (timm's and torchvision's eval transform)."""
    size = int(size or prep["pretrained_input_size"])
    resample = RESAMPLE.get(prep.get("interpolation", "bilinear"), Image.BILINEAR)
    scale = int(np.floor(size / float(prep.get("crop_pct", 1.0))))
    w, h = img.size
    new = (scale, max(1, round(h * scale / w))) if w <= h else (max(1, round(w * scale / h)), scale)
    img = img.resize(new, resample)
    left, top = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


THUMBNAIL_SIDE, THUMBNAIL_INPUT, PHOTO_INPUT = 64, 96, 160


def auto_input_size(median_side: int) -> int:
    """Input size for the data: thumbnails (a median side up to 64 px, like simpsons_mnist's 28) at 96 px, else 160.

    Thumbnails are upscaled less than photos: 160 px would cost 2.8× 96 px's compute for detail they do
    not hold. 96 rather than 64 because ImageNet features need the room: simpsons_mnist with Lite2,
    split seeds 0 / 1 / 2, scored 0.905-0.915 at 64 px and 0.936-0.945 at 96 px (8 epochs each).
    """
    if 0 < median_side <= THUMBNAIL_SIDE:
        return THUMBNAIL_INPUT
    return PHOTO_INPUT


def resolve_input_size(input_size: int, paths, seed: int = 0) -> int:
    """`--input-size 0` means the size for these images (96 px for thumbnails, else 160), from a sample of headers."""
    if input_size:
        return input_size
    return auto_input_size(probe_median_side(list(paths), seed=seed))
