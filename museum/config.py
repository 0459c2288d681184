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
    """`museum train-text`: Word2Vec + BiLSTM blended with a TF-IDF linear expert."""

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
    # BiLSTM
    epochs: int = 15
    patience: int = 4
    batch_size: int = 64
    hidden: int = 128
    dropout: float = 0.3
    lr: float = 2e-3
    weight_decay: float = 1e-4
    freeze_embeddings_epochs: int = 2
    # TF-IDF expert and the blend
    tfidf: bool = True
    tfidf_c: float = 0.2
    blend_weight: float | None = None  # weight of the LSTM; None = chosen on validation
