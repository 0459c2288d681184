"""One typed config per trainer; the CLI options mirror these fields one to one.

Configs are written into the run folder and into checkpoints as plain dicts
(`dataclasses.asdict`) and rebuilt with `from_dict`, which ignores unknown keys so
that older artifacts keep loading.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass `cls` from a plain dict, ignoring keys it does not know."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def config_to_dict(config: Any) -> dict[str, Any]:
    return asdict(config)


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
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    # Tuning guard: cross-validated gain over the defaults that a tuned setting must show.
    tune_folds: int = 5
    tune_min_gain: float = 0.005
    seed: int = 0


@dataclass
class ImageConfig:
    """`museum train-image`: a torchvision backbone fine-tuned on decoded-once images."""

    seed: int = 0
    val_fraction: float = 0.2
    dedup_split: bool = False  # keep near-duplicate groups on one side of the train/validation split
    device: str = "auto"
    # model
    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"  # imagenet | none | path to a state dict
    input_size: int = 0  # 0 = from the data: 64 px for thumbnails, else 160 px
    # optimisation
    epochs: int = 0  # 0 = from the training-set size (see `auto_epochs`)
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
    members: int = 0  # networks trained under seeds seed, seed+100, ... and averaged; 0 = auto: 3 below 500 training images, else 1
    # augmentation
    crop_scale: float = 0.35  # smallest area share of a random resized crop
    color_jitter: float = 0.3
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
