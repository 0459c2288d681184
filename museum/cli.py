"""The `museum` command line: each command validates its options, builds a config and calls
one library function. Errors in the user's input print one line and exit with status 2."""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from museum import __version__
from museum.errors import MuseumError
from museum.log import setup_logging
from museum.folders import check_not_input
from museum.utils import check_out_file, check_out_folder

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Tell a museum item's typology from its photo, its Russian description, or both.",
)

DEFAULT_TEXT_MODEL = Path("models/text")
DEFAULT_IMAGE_MODEL = Path("models/image")

_MODEL_HELP = "Folder written by train-{kind} (default {default}), or `none` to go without the {kind} model."
_IMAGES_HELP = "Folder of {guid}.jpg images (default: images/ beside the CSV, if there is one)."

# Options shared by several commands: one definition each (typer reads a shared default fine).
DEVICE_OPTION = typer.Option("auto", help="auto, cpu or cuda.")
IMAGES_OPTION = typer.Option(None, "--images", help=_IMAGES_HELP)
TEXT_MODEL_OPTION = typer.Option(str(DEFAULT_TEXT_MODEL), "--text-model", help=_MODEL_HELP.format(kind="text", default=DEFAULT_TEXT_MODEL))
IMAGE_MODEL_OPTION = typer.Option(str(DEFAULT_IMAGE_MODEL), "--image-model", help=_MODEL_HELP.format(kind="image", default=DEFAULT_IMAGE_MODEL))
BATCH_OPTION = typer.Option(64, help="Images per batch.")
WORKERS_OPTION = typer.Option(2, help="DataLoader workers decoding images.")
# submit and evaluate: cascade settings, each overriding fusion.json (or the defaults) when given.
TEXT_THRESHOLD_OPTION = typer.Option(None, help="Trust text when its top probability is above this (default 0.7, or the tuned value).")
IMAGE_THRESHOLD_OPTION = typer.Option(None, help="Trust the image when its top probability is above this (default 0.7, or tuned).")
BLEND_WEIGHT_OPTION = typer.Option(None, help="Text weight when blending (default 0.5, or tuned).")
FALLBACK_OPTION = typer.Option(None, help="Class for rows with neither text nor image (default: most frequent training class).")


def friendly_errors(fn: Callable) -> Callable:
    """Turn `MuseumError` (and Ctrl-C) into one line on stderr instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MuseumError as exc:
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
                typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        except OSError as exc:  # a system error no writer turned into a MuseumError: still one line
            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"error: {where}{exc.strerror or exc}; check the path, its permissions and free disk space", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"museum {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    setup_logging(verbose)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 speaks for every rank
        logging.getLogger("museum").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------- text


@app.command("train-text")
@friendly_errors
def train_text(
    train: Path = typer.Option(..., "--train", help="Labelled CSV: guid,description,typology."),
    unlabeled: Optional[list[Path]] = typer.Option(
        None, "--unlabeled", metavar="CSV", help="Extra CSV whose descriptions also train Word2Vec (e.g. test.csv); repeat for more."
    ),
    out: Path = typer.Option(DEFAULT_TEXT_MODEL, "--out", help="Model folder to write."),
    epochs: int = typer.Option(20, help="Maximum BiLSTM epochs (early stopping on validation macro-F1)."),
    patience: int = typer.Option(5, help="Epochs without improvement before stopping."),
    seed: int = typer.Option(0, min=0, help="One seed for the split, Word2Vec, torch and sklearn."),
    device: str = DEVICE_OPTION,
    val_fraction: float = typer.Option(0.2, help="Stratified validation share."),
    lemmatize: bool = typer.Option(False, "--lemmatize/--no-lemmatize", help="Lemmatize tokens with pymorphy3."),
    navec: bool = typer.Option(True, "--navec/--no-navec", help="Warm-start Word2Vec from navec vectors."),
    tfidf: bool = typer.Option(True, "--tfidf/--no-tfidf", help="Blend in the TF-IDF linear expert."),
    vectors_weight: float = typer.Option(0.2, help="Weight of the navec word-vector expert in the blend (0..1); 0 leaves it out."),
    blend_weight: str = typer.Option(
        "0.2", help="BiLSTM weight in the blend (0..1), or `auto` to choose it on validation; the word-vector expert "
        "gets --vectors-weight and TF-IDF the rest."
    ),
    batch_size: int = typer.Option(64, help="BiLSTM batch size."),
    hidden: int = typer.Option(64, help="BiLSTM hidden units per direction."),
    lr: float = typer.Option(2e-3, help="AdamW learning rate."),
) -> None:
    """Train the text expert (Word2Vec + BiLSTM, blended with TF-IDF and word-vector experts) on descriptions."""
    from museum.config import TextConfig
    from museum.train_text import train_text_model

    weight = _parse_blend_weight(blend_weight)
    _check_share("--vectors-weight", vectors_weight)
    if tfidf and (weight or 0.0) + vectors_weight > 1.0:
        raise MuseumError(f"--blend-weight {blend_weight} + --vectors-weight {vectors_weight}: more than 1 leaves "
                          "TF-IDF nothing; lower one of them, or pass --no-tfidf")
    if epochs < 1:
        raise MuseumError(f"--epochs {epochs}: must be at least 1")
    config = TextConfig(
        seed=seed, val_fraction=val_fraction, device=device, lemmatize=lemmatize, navec=navec,
        epochs=epochs, patience=patience, batch_size=batch_size, hidden=hidden, lr=lr,
        tfidf=tfidf, vectors_weight=vectors_weight, blend_weight=weight,
    )
    train_text_model(train, out, config, unlabeled=list(unlabeled or []))


def _parse_blend_weight(value: str) -> float | None:
    return None if value.strip().lower() == "auto" else _parse_share("--blend-weight", value)


def _parse_share(option: str, value: str) -> float:
    """A number in [0, 1] given on the command line as text, or a one-line error naming the option."""
    try:
        share = float(value)
    except ValueError:
        raise MuseumError(f"{option} {value}: expected a number between 0 and 1, or auto") from None
    return _check_share(option, share, value)


def _check_share(option: str, share: float, given: str | None = None) -> float:
    """`share` if it lies in [0, 1]; else a one-line error quoting the value as given."""
    if not 0.0 <= share <= 1.0:
        raise MuseumError(f"{option} {given if given is not None else share}: must be between 0 and 1")
    return share


@app.command("predict-text")
@friendly_errors
def predict_text(
    texts: list[str] = typer.Argument(..., metavar="TEXT", help="One or more descriptions."),
    model: Path = typer.Option(DEFAULT_TEXT_MODEL, "--model", help="Folder written by train-text."),
    top: int = typer.Option(3, help="How many classes to show."),
) -> None:
    """Print the most probable typologies of descriptions."""
    from museum.metrics import top_k
    from museum.text.model import TextModel

    if top < 1:
        raise MuseumError(f"--top {top}: must be at least 1")
    text_model = TextModel.load(model)
    for text, best in zip(texts, top_k(text_model.predict_proba(texts), text_model.classes_, top)):
        typer.echo(text)
        if not text.strip():
            typer.echo("  (empty description: nothing to judge; `submit` uses the image for such rows)")
        for label, p in best:
            typer.echo(f"  {p:6.3f}  {label}")


# ----------------------------------------------------------------------------- cascade: submit, tune, evaluate



def _model_folder(value: str) -> Optional[Path]:
    """`none` (any case) means: do without this expert."""
    return None if value.strip().lower() == "none" else Path(value)


def _fusion_overrides(
    text_threshold: Optional[float] = None,
    image_threshold: Optional[float] = None,
    blend_weight: Optional[float] = None,
    fallback: Optional[str] = None,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
    chunk_size: int = 10_000,
) -> dict:
    """Check the shared cascade options and return them as FusionConfig overrides (None = keep saved/default)."""
    for name, value in (("--text-threshold", text_threshold), ("--image-threshold", image_threshold),
                        ("--blend-weight", blend_weight)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise MuseumError(f"{name} {value}: must be between 0 and 1")
    if batch_size < 1:
        raise MuseumError(f"--batch-size {batch_size}: must be at least 1")
    if workers < 0:
        raise MuseumError(f"--workers {workers}: must be 0 or more")
    if chunk_size < 1:
        raise MuseumError(f"--chunk-size {chunk_size}: must be at least 1")
    return dict(text_threshold=text_threshold, image_threshold=image_threshold, blend_weight=blend_weight,
                fallback=fallback, batch_size=batch_size, workers=workers, device=device, chunk_size=chunk_size)


@app.command("submit")
@friendly_errors
def submit_cmd(
    test_csv: Path = typer.Argument(..., metavar="TEST_CSV", help="Test CSV: guid,description[,typology]."),
    images: Optional[Path] = IMAGES_OPTION,
    text_model: str = TEXT_MODEL_OPTION,
    image_model: str = IMAGE_MODEL_OPTION,
    out: Path = typer.Option(Path("submissions/submission.csv"), "--out", help="Submission to write (guid,typology)."),
    text_threshold: Optional[float] = TEXT_THRESHOLD_OPTION,
    image_threshold: Optional[float] = IMAGE_THRESHOLD_OPTION,
    blend_weight: Optional[float] = BLEND_WEIGHT_OPTION,
    fallback: Optional[str] = FALLBACK_OPTION,
    proba: Optional[Path] = typer.Option(None, "--proba", help="Also write per-class probabilities and each row's route here."),
    settings: Optional[Path] = typer.Option(None, "--settings", help="Tuned settings (default: fusion.json beside the model folders)."),
    batch_size: int = BATCH_OPTION,
    workers: int = WORKERS_OPTION,
    device: str = DEVICE_OPTION,
    chunk_size: int = typer.Option(10_000, help="Rows held in memory at a time."),
) -> None:
    """Write a submission: text when sure, else image when sure, else a blend; fallback for empty rows."""
    from museum.submit import submit

    check_out_file(out, "--out")
    if proba is not None:
        check_out_file(proba, "--proba")
    overrides = _fusion_overrides(text_threshold, image_threshold, blend_weight, fallback, batch_size, workers, device, chunk_size)
    summary = submit(test_csv, out, images, _model_folder(text_model), _model_folder(image_model), proba, overrides, settings)
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 wrote the files and holds every rank's counts
        typer.echo(summary.format())


@app.command("tune")
@friendly_errors
def tune_cmd(
    valid: Optional[Path] = typer.Option(None, "--valid", help="Labelled CSV the models were not trained on (the cascade's grid is tuned on it)."),
    cross_fit: Optional[Path] = typer.Option(
        None, "--cross-fit", metavar="LABELLED_CSV",
        help="Labelled CSV (rows may overlap the models' training data): retrain each expert per fold without the fold's "
        "rows, and fit the fusion (cascade, weighted or stacker) on the out-of-fold probabilities."),
    cross_fit_folds: int = typer.Option(5, help="With --cross-fit: folds (each expert is retrained once per fold)."),
    images: Optional[Path] = IMAGES_OPTION,
    text_model: str = TEXT_MODEL_OPTION,
    image_model: str = IMAGE_MODEL_OPTION,
    out: Optional[Path] = typer.Option(None, "--out", help="Settings file to write (default: fusion.json beside the model folders)."),
    text_threshold: float = typer.Option(0.7, help="Default to beat: text threshold."),
    image_threshold: float = typer.Option(0.7, help="Default to beat: image threshold."),
    blend_weight: float = typer.Option(0.5, help="Default to beat: text weight in the blend."),
    fallback: Optional[str] = typer.Option(None, help="Class for rows with neither modality (default: most frequent training class)."),
    folds: int = typer.Option(5, help="Cross-validation folds that estimate the gain of tuning."),
    min_gain: float = typer.Option(0.005, help="Out-of-fold macro-F1 gain needed to leave the defaults."),
    seed: int = typer.Option(0, min=0, help="Seed of the folds."),
    batch_size: int = BATCH_OPTION,
    workers: int = WORKERS_OPTION,
    device: str = DEVICE_OPTION,
) -> None:
    """Fit how the experts are combined, for macro-F1, and save it for submit, evaluate and serve (fusion.json)."""
    from museum.evaluate import tune, tune_cross_fit

    if (valid is None) == (cross_fit is None):
        raise MuseumError("give one of --valid (a held-out labelled CSV) or --cross-fit (any labelled CSV)")
    if folds < 2:
        raise MuseumError(f"--folds {folds}: must be at least 2")
    if cross_fit_folds < 2:
        raise MuseumError(f"--cross-fit-folds {cross_fit_folds}: must be at least 2")
    if out is not None:
        check_out_file(out, "--out")
    overrides = _fusion_overrides(text_threshold, image_threshold, blend_weight, fallback, batch_size, workers, device)
    overrides.update(tune_folds=folds, tune_min_gain=min_gain, seed=seed)
    models = _model_folder(text_model), _model_folder(image_model)
    if cross_fit is not None:
        text = tune_cross_fit(cross_fit, images, *models, overrides, out, cross_fit_folds, seed)[2]
    else:
        text = tune(valid, images, *models, overrides, out)[2]
    typer.echo(text)


@app.command("evaluate")
@friendly_errors
def evaluate_cmd(
    labeled: Path = typer.Argument(..., metavar="LABELLED_CSV", help="Labelled CSV: guid,description,typology."),
    images: Optional[Path] = IMAGES_OPTION,
    text_model: str = TEXT_MODEL_OPTION,
    image_model: str = IMAGE_MODEL_OPTION,
    text_threshold: Optional[float] = TEXT_THRESHOLD_OPTION,
    image_threshold: Optional[float] = IMAGE_THRESHOLD_OPTION,
    blend_weight: Optional[float] = BLEND_WEIGHT_OPTION,
    fallback: Optional[str] = FALLBACK_OPTION,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write all metrics as JSON here."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write report.html (+ figures) for the cascade here."),
    batch_size: int = BATCH_OPTION,
    workers: int = WORKERS_OPTION,
    device: str = DEVICE_OPTION,
) -> None:
    """Macro-F1, accuracy and per-class reports: text-only, image-only, cascade and each route."""
    from museum.evaluate import evaluate

    if json_out is not None:
        check_out_file(json_out, "--json")
    if report is not None:
        check_out_folder(report, "--report")
    overrides = _fusion_overrides(text_threshold, image_threshold, blend_weight, fallback, batch_size, workers, device)
    typer.echo(evaluate(labeled, images, _model_folder(text_model), _model_folder(image_model), overrides, json_out, report).text)


# ----------------------------------------------------------------------------- image


@app.command("train-image")
@friendly_errors
def train_image(
    images: Path = typer.Option(..., "--images", help="DIR/<class>/*.jpg, or with --train the folder of {guid}.jpg."),
    train: Optional[Path] = typer.Option(None, "--train", help="Competition CSV (guid,description,typology) for DIR/{guid}.jpg."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation DIR/<class>/*.jpg; default: a stratified split."),
    out: Path = typer.Option(DEFAULT_IMAGE_MODEL, "--out", help="Model folder to write."),
    backbone: str = typer.Option("mobilenet_v2", help="torchvision model name (resnet18, efficientnet_b0, ...)."),
    weights: str = typer.Option("imagenet", help="imagenet, none, or a .pth state dict file."),
    input_size: int = typer.Option(0, help="Square input size in pixels; 0 = from the data (64 for thumbnails, else 160)."),
    epochs: int = typer.Option(0, help="Maximum epochs (early stopping on validation macro-F1); 0 = from the data size, 8..20."),
    patience: int = typer.Option(5, help="Epochs without improvement before stopping."),
    batch_size: int = typer.Option(32, help="Images per step (per process under torchrun)."),
    lr: float = typer.Option(1e-3, help="AdamW peak learning rate."),
    weight_decay: float = typer.Option(0.05, help="AdamW weight decay."),
    warmup_epochs: float = typer.Option(1.0, help="Linear warm-up after the frozen epochs."),
    freeze_epochs: int = typer.Option(0, help="Head-only epochs before the backbone trains."),
    trainable: float = typer.Option(1.0, help="Share of backbone layers, from the top, that fine-tune (1 = all)."),
    backbone_lr: float = typer.Option(1.0, help="Backbone learning rate as a share of --lr (the new head gets --lr)."),
    ema: float = typer.Option(0.15, help="Validate and keep an average of the weights over this share of all steps; 0 = off."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Score each image and its mirror image, averaged."),
    members: int = typer.Option(0, help="Networks to fine-tune (seeds SEED, SEED+100, ...) and average; 0 = auto: 3 below 500 training images, else 1."),
    label_smoothing: float = typer.Option(0.1, help="Cross-entropy label smoothing."),
    balance: str = typer.Option("loss", help="loss (cross-entropy weighted ∝ 1/class count, at most 10× apart), sampler (class-balanced draws) or none."),
    soft_f1: float = typer.Option(0.0, help="Weight of the soft-F1 term in the loss, 0..1."),
    crop_scale: float = typer.Option(0.35, help="Smallest area share of the random resized crop."),
    color_jitter: float = typer.Option(0.3, help="Brightness/contrast/saturation jitter, 0 = off."),
    mixup: str = typer.Option("auto", help="Share of batches trained on mixup blends of image pairs (0..1), or auto: 1 when training runs 10 epochs or more, else 0."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA."),
    workers: int = typer.Option(0, help="Decoding processes; 0 = min(4, CPUs)."),
    threads: int = typer.Option(0, help="torch CPU threads; 0 = CPUs per process."),
    cache_dir: Optional[Path] = typer.Option(None, help="Keep decoded images here, keyed by content hash and size."),
    seed: int = typer.Option(0, min=0, help="One seed for the split, initialisation, sampling and augmentation."),
    device: str = DEVICE_OPTION,
    val_fraction: float = typer.Option(0.2, help="Stratified validation share when --val is not given."),
    dedup_split: bool = typer.Option(False, "--dedup-split", help="Keep near-duplicate images on one side of the split (no leak into validation)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT/last.pt."),
    head: str = typer.Option("finetune", help="finetune, or a scikit-learn head on frozen embeddings: logreg, svm, mlp, knn."),
    head_features: str = typer.Option("stages", help="With --head: stages (several trunk stages + colour histogram) or pooled (final vector)."),
    embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="With --head: .npz from `museum embed` to reuse (written if absent or stale)."),
    positive: Optional[str] = typer.Option(None, "--positive", help="One-vs-rest: this class against all others (two-class sets: default the smaller class)."),
    target_precision: Optional[float] = typer.Option(None, help="Binary tasks: threshold = lowest reaching this validation precision (default: max F1)."),
) -> None:
    """Fine-tune an ImageNet CNN (or fit a head on its embeddings) on a folder-per-class set or the competition's photos."""
    from museum.config import ImageConfig
    from museum.image.embed import check_features
    from museum.image.heads import HEADS
    from museum.image.train import BALANCE
    from museum.train_image import train_image_model

    if epochs < 0:
        raise MuseumError(f"--epochs {epochs}: must be 0 (auto) or at least 1")
    if patience < 1:
        raise MuseumError(f"--patience {patience}: must be at least 1")
    if batch_size < 2:
        raise MuseumError(f"--batch-size {batch_size}: must be at least 2")
    if input_size != 0 and not 16 <= input_size <= 1024:
        raise MuseumError(f"--input-size {input_size}: must be 0 (auto) or between 16 and 1024")
    if balance not in BALANCE:
        raise MuseumError(f"--balance {balance}: expected one of {', '.join(BALANCE)}")
    for name, value in (("--soft-f1", soft_f1), ("--label-smoothing", label_smoothing), ("--color-jitter", color_jitter)):
        if not 0.0 <= value < 1.0 + (name == "--soft-f1"):
            raise MuseumError(f"{name} {value}: must be between 0 and 1")
    mixup_share = None if mixup.strip().lower() == "auto" else _parse_share("--mixup", mixup)
    if not 0.05 <= crop_scale <= 1.0:
        raise MuseumError(f"--crop-scale {crop_scale}: must be between 0.05 and 1")
    if lr <= 0:
        raise MuseumError(f"--lr {lr}: must be positive")
    for name, value in (("--weight-decay", weight_decay), ("--warmup-epochs", warmup_epochs),
                        ("--freeze-epochs", freeze_epochs), ("--workers", workers), ("--threads", threads)):
        if value < 0:
            raise MuseumError(f"{name} {value}: must be 0 or more")
    if not 0.0 <= trainable <= 1.0:
        raise MuseumError(f"--trainable {trainable}: must be between 0 and 1")
    if not 0.0 < backbone_lr <= 1.0:
        raise MuseumError(f"--backbone-lr {backbone_lr}: must be in (0, 1]")
    if not 0.0 <= ema < 1.0:
        raise MuseumError(f"--ema {ema}: must be between 0 (off) and 1")
    if head not in HEADS:
        raise MuseumError(f"--head {head}: expected one of {', '.join(HEADS)}")
    if members < 0:
        raise MuseumError(f"--members {members}: must be 0 (auto) or at least 1")
    if members > 1 and head != "finetune":
        raise MuseumError(f"--members {members}: only fine-tuning trains several networks; drop it with --head {head}")
    if head != "finetune" and resume:
        raise MuseumError(f"--resume: a {head} head trains in one go; drop --resume")
    check_features(head_features, "--head-features")
    if embeddings is not None and head == "finetune":
        raise MuseumError("--embeddings: only used with --head logreg|svm|mlp|knn")
    if target_precision is not None and not 0.0 < target_precision <= 1.0:
        raise MuseumError(f"--target-precision {target_precision}: must be in (0, 1]")
    config = ImageConfig(
        seed=seed, val_fraction=val_fraction, dedup_split=dedup_split, device=device, backbone=backbone, weights=weights,
        input_size=input_size, epochs=epochs, patience=patience, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup_epochs=warmup_epochs, freeze_epochs=freeze_epochs, trainable=trainable,
        backbone_lr=backbone_lr, ema=ema, tta=tta, members=members, label_smoothing=label_smoothing, balance=balance, soft_f1=soft_f1, crop_scale=crop_scale,
        color_jitter=color_jitter, mixup=mixup_share, amp=amp, workers=workers, threads=threads,
        cache_dir=str(cache_dir) if cache_dir else None, head=head, head_features=head_features,
        embeddings=str(embeddings) if embeddings else None, positive=positive, target_precision=target_precision,
    )
    train_image_model(config, images, out, train_csv=train, val=val, resume=resume)


@app.command("embed")
@friendly_errors
def embed_cmd(
    images: Path = typer.Argument(..., metavar="FOLDER_OR_CSV", help="DIR/<class>/*.jpg, or the competition CSV (then --images is the folder of {guid}.jpg)."),
    image_dir: Optional[Path] = typer.Option(None, "--images", help="With a CSV: folder of {guid}.jpg (default: images/ beside it)."),
    out: Path = typer.Option(Path("embeddings.npz"), "--out", help="Embeddings file to write (reused as is when up to date)."),
    backbone: str = typer.Option("mobilenet_v2", help="torchvision model name."),
    weights: str = typer.Option("imagenet", help="imagenet or a .pth state dict file."),
    input_size: int = typer.Option(0, help="Square input size; 0 = as train-image picks (64 for thumbnails, else 160)."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Average each image's features with its mirror's (as train-image --head)."),
    features: str = typer.Option("stages", help="stages (several trunk stages + colour histogram, as train-image --head) or pooled (final vector)."),
    workers: int = typer.Option(0, help="Decoding processes; 0 = min(4, CPUs)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Keep decoded images here, keyed by content hash and size."),
    device: str = DEVICE_OPTION,
) -> None:
    """Write backbone features of an image set (features, labels, paths, settings) to one .npz."""
    from museum.image.embed import embed_folder

    if input_size != 0 and not 16 <= input_size <= 1024:
        raise MuseumError(f"--input-size {input_size}: must be 0 (auto) or between 16 and 1024")
    if out.suffix != ".npz":
        raise MuseumError(f"--out {out}: must end in .npz")
    if images.is_file():  # a CSV: images beside it unless --images says otherwise
        train_csv, folder = images, image_dir or images.parent / "images"
    else:
        train_csv, folder = None, images
    check_not_input(out, [train_csv, folder])
    emb = embed_folder(folder, out, train_csv, backbone, weights, input_size, device, workers,
                       str(cache_dir) if cache_dir else None, tta=tta, features=features)
    typer.echo(f"{out}: {emb.features.shape[0]} images x {emb.features.shape[1]} features "
               f"({emb.meta['backbone']} {emb.meta['features']}, {emb.meta['input_size']} px, {len(set(emb.labels))} classes)")


@app.command("predict-image")
@friendly_errors
def predict_image(
    paths: list[Path] = typer.Argument(..., metavar="IMAGE", help="One or more image files."),
    model: Path = typer.Option(DEFAULT_IMAGE_MODEL, "--model", help="Folder written by train-image."),
    top: int = typer.Option(3, help="How many classes to show."),
    device: str = DEVICE_OPTION,
) -> None:
    """Print the most probable classes of images (unreadable files are reported, not fatal)."""
    from museum.image.model import ImageModel
    from museum.metrics import top_k

    if top < 1:
        raise MuseumError(f"--top {top}: must be at least 1")
    image_model = ImageModel.load(model, device=device)
    proba, ok = image_model.predict_paths(paths, num_workers=0 if len(paths) < 64 else 2)
    decision = image_model.decision
    if decision:
        from museum.image.binary import unshift_score

        typer.echo(f"{decision['positive']} when its score > {decision['threshold']:.4f} "
                   "(probabilities below are shifted so that 0.5 is that threshold)")
    best = top_k(proba[ok], image_model.classes_, top) if ok.any() else []
    rows = iter(best)
    for i, (path, good) in enumerate(zip(paths, ok)):
        typer.echo(str(path))
        if not good:
            from museum.data.images import ImageDecodeError, safe_open_image

            try:
                safe_open_image(path)
                reason = "unreadable"
            except ImageDecodeError as exc:
                reason = exc.reason
            typer.echo(f"  cannot read: {reason}")
            continue
        for label, p in next(rows):
            typer.echo(f"  {p:6.3f}  {label}")
        if decision:
            pos = image_model.classes_.index(decision["positive"])
            score = float(unshift_score(proba[i, pos], decision["threshold"]))
            typer.echo(f"  score {score:.4f} -> {image_model.classes_[pos if score > decision['threshold'] else 1 - pos]}")


# ----------------------------------------------------------------------------- serve


@app.command("serve")
@friendly_errors
def serve_cmd(
    text_model: str = TEXT_MODEL_OPTION,
    image_model: str = IMAGE_MODEL_OPTION,
    host: str = typer.Option("127.0.0.1", help="Address to bind; the default is reachable from this machine only."),
    port: int = typer.Option(8000, help="TCP port."),
    settings: Optional[Path] = typer.Option(None, "--settings", help="Tuned settings (default: fusion.json beside the model folders)."),
    max_upload_mb: int = typer.Option(12, help="Largest request body for a photo + description, in MB."),
    max_csv_mb: int = typer.Option(50, help="Largest CSV upload for a submission, in MB."),
    timeout: float = typer.Option(30.0, help="Seconds a request may take before it is answered 504."),
    device: str = DEVICE_OPTION,
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="Log one line per request."),
) -> None:
    """Serve a page and a JSON API (/predict, /submit, /models, /health) over the trained models."""
    try:
        from museum.serve import Limits, run_server
        from museum.serve.limits import MB
    except ImportError as exc:
        raise MuseumError(f"museum serve needs the serve extra ({exc.name} is missing): pip install -e '.[serve]'") from None

    if not 0 < port < 65536:
        raise MuseumError(f"--port {port}: must be between 1 and 65535")
    for name, value in (("--max-upload-mb", max_upload_mb), ("--max-csv-mb", max_csv_mb)):
        if not 1 <= value <= 1024:
            raise MuseumError(f"{name} {value}: must be between 1 and 1024")
    if not 0 < timeout <= 3600:
        raise MuseumError(f"--timeout {timeout}: must be between 0 and 3600 seconds")
    limits = Limits(upload_bytes=max_upload_mb * MB, csv_bytes=max_csv_mb * MB, timeout_s=timeout)
    run_server(_model_folder(text_model), _model_folder(image_model), host, port, device, settings, limits, access_log)


# ----------------------------------------------------------------------------- reports and dataset analysis


@app.command("report")
@friendly_errors
def report_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="Run folder of train-text or train-image (finished or interrupted)."),
) -> None:
    """Rebuild report.html and its PNG figures in a run folder."""
    from museum.reports.run_report import build_run_report

    if not run_dir.is_dir():
        raise MuseumError(f"{run_dir}: not a folder; give a run folder written by train-text or train-image")
    start = time.perf_counter()
    path = build_run_report(run_dir)
    typer.echo(f"report written to {path} in {time.perf_counter() - start:.1f}s")


@app.command("eda")
@friendly_errors
def eda_cmd(
    path: Path = typer.Argument(..., metavar="CSV_OR_FOLDER", help="Competition CSV (guid,description[,typology]) or DIR/<class>/*.jpg."),
    images: Optional[Path] = typer.Option(None, "--images", help="With a CSV: folder of {guid}.jpg (default: images/ beside the CSV, if there is one)."),
    stats: bool = typer.Option(False, "--stats", help="Also write per-channel mean/std (channel_stats.json) for train-image."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for eda.html, eda.json and the figures (default: reports/eda-NAME)."),
) -> None:
    """Analyse a dataset: classes, imbalance, description lengths, duplicates, image sizes, unreadable files."""
    from museum.reports.eda import run_eda

    if not path.exists():
        raise MuseumError(f"{path}: not found; give a competition CSV or a folder of class sub-folders")
    check_not_input(out, [path, images], folder=True)
    typer.echo(run_eda(path, images, stats, out).text)


# ----------------------------------------------------------------------------- data cleaning


@app.command("clean")
@friendly_errors
def clean_cmd(
    train: Optional[Path] = typer.Argument(None, metavar="TRAIN_CSV", help="Competition CSV (guid,description,typology); omit to audit --images DIR/<class>/*.jpg."),
    images: Optional[Path] = typer.Option(None, "--images", help="With a CSV: folder of {guid}.jpg; alone: DIR/<class>/*.jpg."),
    folds: int = typer.Option(5, help="Stratified folds for the out-of-fold probabilities."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for label_issues.csv/.html, oof.npz (default reports/clean-NAME)."),
    expert: str = typer.Option("fast", help="Text expert per fold: fast (TF-IDF, seconds) or full (TextModel, ~30 s a fold)."),
    drop: bool = typer.Option(False, "--drop", help="Also write a cleaned copy without the flagged rows."),
    relabel: bool = typer.Option(False, "--relabel", help="Also write a cleaned copy with flagged rows given the suggested label."),
    reuse: bool = typer.Option(False, "--reuse", help="Rerun the audit on the probabilities saved in --out; train nothing."),
    top: int = typer.Option(100, help="Rows shown on the HTML page."),
    seed: int = typer.Option(0, min=0, help="Seed of the folds and the experts."),
    embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="A `museum embed` file (stages features) of these images, read instead of embedding them again."),
) -> None:
    """Find likely label errors (confident learning on out-of-fold probabilities); optionally drop or relabel them."""
    from museum.clean import EXPERTS, run_clean

    if drop and relabel:
        raise MuseumError("--drop and --relabel: choose one")
    if folds < 2:
        raise MuseumError(f"--folds {folds}: must be at least 2")
    if expert not in EXPERTS:
        raise MuseumError(f"--expert {expert}: expected one of {', '.join(EXPERTS)}")
    if top < 1:
        raise MuseumError(f"--top {top}: must be at least 1")
    action = "drop" if drop else "relabel" if relabel else "report"
    if embeddings is not None and reuse:
        raise MuseumError("--embeddings: --reuse takes the saved probabilities and embeds nothing; drop one of them")
    check_not_input(out, [train, images, embeddings], folder=True)
    typer.echo(run_clean(train, images, out, folds, seed, expert, action, reuse, top, embeddings).text)


@app.command("dedup")
@friendly_errors
def dedup_cmd(
    path: Path = typer.Argument(..., metavar="FOLDER_OR_CSV", help="Image folder (DIR/<class>/*.jpg or DIR/*.jpg) or a competition CSV."),
    images: Optional[Path] = typer.Option(None, "--images", help="With a CSV: folder of {guid}.jpg (without it, only descriptions are compared)."),
    threshold: Optional[float] = typer.Option(None, help="Cosine similarity of embeddings from which two images are near duplicates on that alone (default 0.96); from 0.6 up, a matching centre-crop hash also makes them duplicates."),
    keep: str = typer.Option("all", help="all (report only) or one (also write a list/CSV keeping one item per group)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for groups.csv and dedup.html (default reports/dedup-NAME)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (for the embeddings)."),
    embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="A `museum embed --features pooled` file of these images, read instead of embedding them again."),
) -> None:
    """Find exact, near-duplicate and same-description groups; optionally keep one item per group."""
    from museum.dedup import DEFAULT_THRESHOLD, KEEP, run_dedup

    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise MuseumError(f"--threshold {threshold}: must be in (0, 1]")
    if keep not in KEEP:
        raise MuseumError(f"--keep {keep}: expected one of {', '.join(KEEP)}")
    check_not_input(out, [path, images, embeddings], folder=True)
    typer.echo(run_dedup(path, images, out, DEFAULT_THRESHOLD if threshold is None else threshold, keep, device,
                         embeddings).text)


# ----------------------------------------------------------------------------- doctor


@app.command("doctor")
@friendly_errors
def doctor_cmd() -> None:
    """Show what is installed and found (packages, navec vectors, offline weights, CUDA, chromium) and how to get what is missing."""
    from museum.doctor import run_doctor

    report, healthy = run_doctor()
    typer.echo(report)
    if not healthy:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- export


@app.command("export")
@friendly_errors
def export_cmd(
    model: Path = typer.Argument(..., metavar="MODEL_DIR", help="Folder written by train-image (fine-tuned or head)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx (ONNX Runtime; the export extra) or torchscript."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write (default: MODEL_DIR-FORMAT beside the model)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Images to check the export on, any layout (default: the model's validation images)."),
) -> None:
    """Export an image model to ONNX or TorchScript; written only if it agrees with the model on up to 100 real images."""
    from museum.image.export import FORMATS, export_model

    if fmt not in FORMATS:
        raise MuseumError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    meta = export_model(model, fmt, out, images)
    parity = meta["parity"]
    typer.echo(f"{meta['graph']} written to {meta['folder']}: on {parity['images']} images the largest probability "
               f"difference from the model is {parity['max_abs_diff']:.1e} (tolerance {parity['tolerance']:g})")
