"""One typed config per trainer; the CLI options mirror these fields one to one.

Configs are written into the run folder and into checkpoints as plain dicts
(`dataclasses.asdict`) and rebuilt with `from_dict`, which ignores unknown keys so
that older artifacts keep loading. Each config checks its own values when it is built
(`__post_init__`), so a bad value from the command line, a config file (`museum.configfile`)
or library code gets the same one-line `MuseumError`, naming the option as `--name-with-dashes`.
"""

from __future__ import annotations

import numbers
import os
import types
from dataclasses import asdict, dataclass, fields
from functools import cache
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from museum.errors import MuseumError

T = TypeVar("T")

# Choices of ImageConfig fields (the image modules take them from here).
IMAGE_HEADS = ("finetune", "logreg", "svm", "mlp", "knn")
BALANCE = ("loss", "sampler", "none")
HEAD_FEATURES = ("stages", "pooled")
# Fields whose command-line option is not `--` + the field name with dashes (`museum tune`).
OPTION_NAMES = {"tune_folds": "--folds", "tune_min_gain": "--min-gain"}


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass `cls` from a plain dict, ignoring keys it does not know."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def config_to_dict(config: Any) -> dict[str, Any]:
    return asdict(config)


def option_name(field_name: str) -> str:
    """The command-line option that sets a config field: `val_fraction` -> `--val-fraction`."""
    return OPTION_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


@cache
def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """{field: (base type, None allowed)} of a config dataclass: `float | None` -> (float, True)."""
    out = {}
    for name, hint in get_type_hints(cls).items():
        args = get_args(hint) if isinstance(hint, types.UnionType) or get_origin(hint) is Union else ()
        out[name] = (next((a for a in args if a is not type(None)), hint), type(None) in args)
    return out


def _check_types(config: Any) -> None:
    """Every field holds its declared type (whole numbers stored as floats in float fields, paths as text)."""
    for name, (base, optional) in field_types(type(config)).items():
        value = getattr(config, name)
        if value is None and optional:
            continue
        try:
            setattr(config, name, _as_type(value, base))
        except TypeError:
            what = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(base, base.__name__)
            raise MuseumError(f"{option_name(name)} {value!r}: expected {what}{' or none' if optional else ''}") from None


def _as_type(value: Any, base: type) -> Any:
    """`value` as a field of type `base` keeps it; TypeError if it is no such value (True is never a number here)."""
    if isinstance(value, bool) != (base is bool):
        raise TypeError(base.__name__)
    if base is float and isinstance(value, numbers.Real):
        return float(value)
    if base is int and isinstance(value, numbers.Integral):
        return int(value)
    if base is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, base):
        raise TypeError(base.__name__)
    return value


class _Check:
    """The value checks of a config's `__post_init__`, each a one-line error naming the option."""

    def __init__(self, config: Any):
        self.config = config
        _check_types(config)
        self.at_least("seed", 0)
        if hasattr(config, "val_fraction") and not 0.0 < config.val_fraction < 1.0:
            self.fail("val_fraction", "must be between 0 and 1")
        device = config.device.strip().lower()
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            self.fail("device", "expected auto, cpu or cuda")
        config.device = device  # whether CUDA is there is checked where a run starts (`resolve_device`)

    def fail(self, name: str, why: str) -> None:
        raise MuseumError(f"{option_name(name)} {getattr(self.config, name)}: {why}")

    def at_least(self, name: str, low: float, why: str = "") -> None:
        if getattr(self.config, name) < low:
            self.fail(name, why or ("must be 0 or more" if low == 0 else f"must be at least {low}"))

    def positive(self, name: str) -> None:
        if not getattr(self.config, name) > 0:
            self.fail(name, "must be positive")

    def share(self, name: str, upper_open: bool = False, why: str = "must be between 0 and 1") -> None:
        """In [0, 1] (or [0, 1) with `upper_open`); None (auto) passes."""
        value = getattr(self.config, name)
        if value is not None and not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
            self.fail(name, why)

    def one_of(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self.config, name) not in choices:
            self.fail(name, f"expected one of {', '.join(choices)}")


@dataclass
class TextConfig:
    """`museum train-text`: Word2Vec + BiLSTM blended with TF-IDF and word-vector linear experts."""

    seed: int = 0
    val_fraction: float = 0.2
    device: str = "auto"
    # tokenization
    lemmatize: bool = False
    max_len: int = 64
    # word vectors
    navec: bool = True
    w2v_dim: int = 300
    w2v_epochs: int = 10
    w2v_min_count: int = 1
    embedding_norm: float = 16.0  # mean norm of the vectors fed to the BiLSTM
    # BiLSTM
    epochs: int = 20
    patience: int = 5
    batch_size: int = 64
    hidden: int = 64
    dropout: float = 0.3
    lr: float = 2e-3
    weight_decay: float = 1e-4
    freeze_embeddings_epochs: int = 2
    # TF-IDF expert, word-vector expert and the blend
    tfidf: bool = True
    tfidf_c: float = 0.2
    linear_refit: bool = True  # refit the linear experts on train + validation once the blend is chosen
    vectors_weight: float = 0.2  # weight of the navec word-vector expert in the blend; 0 = no such expert
    vectors_c: float = 0.03
    # BiLSTM weight in the (geometric) blend, TF-IDF gets the rest; None = chosen on validation.
    # Fixed by default: the per-run choice on a few hundred validation rows was measured to be
    # noise (see bench_text).
    blend_weight: float | None = 0.2

    def __post_init__(self) -> None:
        check = _Check(self)
        for name in ("epochs", "patience", "batch_size", "hidden", "max_len", "w2v_dim", "w2v_epochs", "w2v_min_count"):
            check.at_least(name, 1)
        check.at_least("freeze_embeddings_epochs", 0)
        for name in ("lr", "tfidf_c", "vectors_c", "embedding_norm"):
            check.positive(name)
        check.at_least("weight_decay", 0)
        check.share("dropout", upper_open=True)
        check.share("vectors_weight")
        check.share("blend_weight", why="must be between 0 and 1, or auto")
        if self.tfidf and (self.blend_weight or 0.0) + self.vectors_weight > 1.0:
            raise MuseumError(f"--blend-weight {self.blend_weight} + --vectors-weight {self.vectors_weight}: more than 1 "
                              "leaves TF-IDF nothing; lower one of them, or pass --no-tfidf")


@dataclass
class FusionConfig:
    """`museum submit` / `tune` / `evaluate`: how the text and image experts are combined.

    Saved by `museum tune` as `fusion.json` beside the model folders; `submit` reads it
    back, and explicit CLI options override it field by field.
    """

    # Routing: text when its top probability > text_threshold, else image when its top
    # probability > image_threshold, else the blend (strict `>` so 0.7 itself is "unsure").
    text_threshold: float = 0.7
    image_threshold: float = 0.7
    blend_weight: float = 0.5  # weight of the text softmax in the blend
    # Class for rows with neither modality; None = the most frequent training class.
    fallback: str | None = None
    # Streaming and image decoding
    chunk_size: int = 10_000
    batch_size: int = 0  # images per scoring batch; 0 = by device: 64 on a CPU, 256 on CUDA (measured: image/model.py)
    workers: int = 2
    device: str = "auto"
    # Tuning guard: cross-validated gain over the defaults that a tuned setting must show.
    tune_folds: int = 5
    tune_min_gain: float = 0.005
    seed: int = 0

    def __post_init__(self) -> None:
        check = _Check(self)
        for name in ("text_threshold", "image_threshold", "blend_weight"):
            check.share(name)
        check.at_least("chunk_size", 1)
        check.at_least("batch_size", 0, "must be 0 (by device) or at least 1")
        check.at_least("workers", 0)
        check.at_least("tune_folds", 2)


@dataclass
class ImageConfig:
    """`museum train-image`: an ImageNet-pretrained backbone fine-tuned on decoded-once images, or a head on its features."""

    seed: int = 0
    val_fraction: float = 0.2
    dedup_split: bool = False  # keep near-duplicate groups on one side of the train/validation split
    device: str = "auto"
    # model
    # the most accurate offline backbone over the character sets and museum photos (scripts/bench_image.py --backbones)
    backbone: str = "tf_efficientnet_lite2"
    weights: str = "imagenet"  # imagenet | none | path to a state dict
    input_size: int = 0  # 0 = from the data: 96 px for thumbnails, else 160 px
    # optimisation
    epochs: int = 0  # 0 = from the training-set size, input size and device (see `auto_epochs`)
    patience: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    freeze_epochs: int = 0  # head-only epochs before the backbone trains
    trainable: float = 1.0  # share of backbone tensors, from the top, that fine-tune (1 = all)
    backbone_lr: float = 1.0  # backbone learning rate as a share of `lr` (the new head gets all of it)
    label_smoothing: float = 0.1
    balance: str = "loss"  # loss (CE weighted ∝ 1/class count, capped at 10×) | sampler (class-balanced draws) | none
    soft_f1: float = 0.0  # weight of the soft-F1 term in the loss (0..1)
    ema: float = 0.15  # horizon of the weight average that is validated and kept, as a share of all steps; 0 = off
    tta: bool = True  # validate and predict on the mean of each image's and its mirror's logits
    members: int = 0  # networks trained under seeds seed, seed+100, ... and averaged; 0 = auto: 4 below 500 training images, else 1
    # An ensemble alternates two backbones: members 2, 4, ... use this one, with its own pretrained mean/std
    # ("none": every member uses `backbone`; so does `--weights PATH`, a state dict of `backbone` alone).
    mix_backbone: str = "mobilenet_v2"
    # augmentation
    crop_scale: float = 0.35  # smallest area share of a random resized crop
    color_jitter: float = 0.3
    grayscale: float = 0.0  # share of training images turned grey
    mixup: float | None = None  # share of batches trained on mixup blends of pairs; None = auto (see `auto_mixup`)
    # runtime
    amp: bool = True  # mixed precision on CUDA only
    workers: int = 0  # decoding processes; 0 = min(4, CPUs)
    threads: int = 0  # torch CPU threads; 0 = CPUs / processes
    cache_dir: str | None = None  # keep decoded images on disk, keyed by content hash + size
    # embedding heads and yes/no tasks
    head: str = "finetune"  # finetune | logreg | svm | mlp | knn (scikit-learn on frozen embeddings)
    head_features: str = "stages"  # stages (several trunk stages + colour histogram) | pooled (final vector)
    embeddings: str | None = None  # .npz of `museum embed` to reuse (rewritten when its images differ)
    positive: str | None = None  # one-vs-rest: this class against all others
    target_precision: float | None = None  # binary threshold: lowest reaching this precision; None = max F1

    def member_backbone(self, k: int) -> str:
        """The backbone of ensemble member `k` (0 is the first network): `mix_backbone` for every second one."""
        mixed = self.mix_backbone != "none" and self.weights in ("imagenet", "none")
        return self.mix_backbone if mixed and k % 2 == 1 else self.backbone

    def __post_init__(self) -> None:
        check = _Check(self)
        check.at_least("epochs", 0, "must be 0 (auto) or at least 1")
        check.at_least("patience", 1)
        check.at_least("batch_size", 2)  # batch norm needs two images a step
        if self.input_size != 0 and not 16 <= self.input_size <= 1024:
            check.fail("input_size", "must be 0 (auto) or between 16 and 1024")
        check.positive("lr")
        for name in ("weight_decay", "warmup_epochs", "freeze_epochs", "workers", "threads"):
            check.at_least(name, 0)
        check.share("trainable")
        if not 0.0 < self.backbone_lr <= 1.0:
            check.fail("backbone_lr", "must be in (0, 1]")
        check.share("label_smoothing", upper_open=True)
        check.one_of("balance", BALANCE)
        check.share("soft_f1")
        check.share("ema", upper_open=True, why="must be between 0 (off) and 1")
        check.at_least("members", 0, "must be 0 (auto) or at least 1")
        if not 0.05 <= self.crop_scale <= 1.0:
            check.fail("crop_scale", "must be between 0.05 and 1")
        check.share("color_jitter", upper_open=True)
        check.share("grayscale")
        check.share("mixup", why="must be between 0 and 1, or auto")
        check.one_of("head", IMAGE_HEADS)
        check.one_of("head_features", HEAD_FEATURES)
        if not self.mix_backbone.strip():
            check.fail("mix_backbone", "must name a backbone, or none")
        if self.members > 1 and self.head != "finetune":
            check.fail("members", f"only fine-tuning trains several networks; drop it with --head {self.head}")
        if self.embeddings is not None and self.head == "finetune":
            raise MuseumError("--embeddings: only used with --head logreg|svm|mlp|knn")
        if self.target_precision is not None and not 0.0 < self.target_precision <= 1.0:
            check.fail("target_precision", "must be in (0, 1]")
