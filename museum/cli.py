"""The `museum` command line: each command validates its options, builds a config and calls
one library function. Errors in the user's input print one line and exit with status 2.

Conventions shared by every command: `-v` / `-q` set how much is logged (progress bars show only
on a terminal and never under `--quiet`, `museum.log.progress_bar`); `--device` is checked before any
data is read; a default output that an earlier run wrote is never replaced without `--force`
(an `--out` given explicitly is the user's choice); train-text, train-image and tune take
`--config FILE` (YAML, TOML or a run's config.json), with options given on the command line
overriding the file."""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from museum import __version__
from museum.config import FusionConfig, ImageConfig, TextConfig
from museum.errors import MuseumError
from museum.log import setup_logging
from museum.folders import check_not_input
from museum.utils import check_out_file, check_out_folder, default_report_folder

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Tell a museum item's typology from its photo, its Russian description, or both.",
)

DEFAULT_TEXT_MODEL = Path("models/text")
DEFAULT_IMAGE_MODEL = Path("models/image")
DEFAULT_SUBMISSION = Path("submissions/submission.csv")
# Option defaults are the configs' own, so a command without --config builds exactly the default config.
TEXT, IMAGE, FUSION = TextConfig(), ImageConfig(), FusionConfig()

_MODEL_HELP = "Folder written by train-{kind} (default {default}), or `none` to go without the {kind} model."
_IMAGES_HELP = "Folder of {guid}.jpg images (default: images/ beside the CSV, if there is one)."

# Options shared by several commands: one definition each (typer reads a shared default fine).
DEVICE_OPTION = typer.Option("auto", help="auto, cpu or cuda (checked before any data is read).")
IMAGES_OPTION = typer.Option(None, "--images", help=_IMAGES_HELP)
TEXT_MODEL_OPTION = typer.Option(str(DEFAULT_TEXT_MODEL), "--text-model", help=_MODEL_HELP.format(kind="text", default=DEFAULT_TEXT_MODEL))
IMAGE_MODEL_OPTION = typer.Option(str(DEFAULT_IMAGE_MODEL), "--image-model", help=_MODEL_HELP.format(kind="image", default=DEFAULT_IMAGE_MODEL))
BATCH_OPTION = typer.Option(FUSION.batch_size, help="Images per scoring batch; 0 = by device (64 on a CPU, 256 on CUDA).")
WORKERS_OPTION = typer.Option(FUSION.workers, help="DataLoader workers decoding images.")
FORCE_OPTION = typer.Option(False, "--force", help="Replace what an earlier run wrote to the default output.")
CONFIG_OPTION = typer.Option(
    None, "--config", metavar="FILE", help="YAML, TOML or JSON file of config fields (a run's config.json reproduces "
    "that run); options given on the command line override it.")
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only; no progress bars."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if verbose and quiet:
        typer.echo("error: --verbose and --quiet: choose one", err=True)
        raise typer.Exit(2)
    setup_logging(verbose, quiet)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 speaks for every rank
        logging.getLogger("museum").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------- shared checks


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether parameter `name` was given (on the command line), not left at its default. By the source's name:
    typer releases differ in whose click (their own copy or click itself) makes the context."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _explicit(ctx: typer.Context, names: dict[str, str], convert: dict[str, Callable[[Any], Any]] | None = None) -> dict:
    """{config field: value} of the options given on the command line; `names` maps parameter to field."""
    convert = convert or {}
    return {field: convert.get(param, _plain)(ctx.params[param]) for param, field in names.items() if _given(ctx, param)}


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _check_device(device: str) -> None:
    """A CUDA device asked for must be there, before any data is read (auto falls back to the CPU)."""
    name = device.strip().lower()
    if name in ("auto", "cpu"):
        return
    from museum.utils import resolve_device

    resolve_device(name)  # refuses cuda without a GPU, and names that are no device
    if name.startswith("cuda:"):
        import torch

        index = name.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise MuseumError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s), numbered from 0")


def _refuse_earlier_run(ctx: typer.Context, path: Path | None, force: bool, what: str, option: str = "out") -> None:
    """A default output that an earlier run wrote is not replaced silently: refused without --force.

    A new run name was the other choice; but models/text and models/image are also the default inputs
    of submit, tune, evaluate and serve (and reports/clean-NAME of `clean --reuse`), which would go on
    reading the old run. An `--out` given explicitly is the user's choice and may replace it."""
    if path is None or force or _given(ctx, option):
        return
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise MuseumError(f"{path}: holds an earlier {what} (the default --{option}); pass --force to replace it, "
                          f"or --{option} to write elsewhere")


def _parse_auto_share(option: str, value: str) -> float | None:
    """`auto` (None), or a number given on the command line as text (its range is the config's to check)."""
    if value.strip().lower() == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise MuseumError(f"{option} {value}: expected a number between 0 and 1, or auto") from None


# ----------------------------------------------------------------------------- text

TEXT_FIELDS = {name: name for name in ("seed", "val_fraction", "device", "lemmatize", "navec", "tfidf", "vectors_weight",
                                       "blend_weight", "epochs", "patience", "batch_size", "hidden", "lr")}


@app.command("train-text")
@friendly_errors
def train_text(
    ctx: typer.Context,
    train: Path = typer.Option(..., "--train", help="Labelled CSV: guid,description,typology."),
    unlabeled: Optional[list[Path]] = typer.Option(
        None, "--unlabeled", metavar="CSV", help="Extra CSV whose descriptions also train Word2Vec (e.g. test.csv); repeat for more."
    ),
    out: Path = typer.Option(DEFAULT_TEXT_MODEL, "--out", help="Model folder to write (an earlier run's in the default one is replaced only with --force)."),
    config_file: Optional[Path] = CONFIG_OPTION,
    force: bool = FORCE_OPTION,
    epochs: int = typer.Option(TEXT.epochs, help="Maximum BiLSTM epochs (early stopping on validation macro-F1)."),
    patience: int = typer.Option(TEXT.patience, help="Epochs without improvement before stopping."),
    seed: int = typer.Option(TEXT.seed, help="One seed for the split, Word2Vec, torch and sklearn."),
    device: str = DEVICE_OPTION,
    val_fraction: float = typer.Option(TEXT.val_fraction, help="Stratified validation share."),
    lemmatize: bool = typer.Option(TEXT.lemmatize, "--lemmatize/--no-lemmatize", help="Lemmatize tokens with pymorphy3."),
    navec: bool = typer.Option(TEXT.navec, "--navec/--no-navec", help="Warm-start Word2Vec from navec vectors."),
    tfidf: bool = typer.Option(TEXT.tfidf, "--tfidf/--no-tfidf", help="Blend in the TF-IDF linear expert."),
    vectors_weight: float = typer.Option(TEXT.vectors_weight, help="Weight of the navec word-vector expert in the blend (0..1); 0 leaves it out."),
    blend_weight: str = typer.Option(
        str(TEXT.blend_weight), help="BiLSTM weight in the blend (0..1), or `auto` to choose it on validation; the word-vector expert "
        "gets --vectors-weight and TF-IDF the rest."
    ),
    batch_size: int = typer.Option(TEXT.batch_size, help="BiLSTM batch size."),
    hidden: int = typer.Option(TEXT.hidden, help="BiLSTM hidden units per direction."),
    lr: float = typer.Option(TEXT.lr, help="AdamW learning rate."),
) -> None:
    """Train the text expert (Word2Vec + BiLSTM, blended with TF-IDF and word-vector experts) on descriptions."""
    from museum.configfile import config_from_file
    from museum.train_text import train_text_model

    explicit = _explicit(ctx, TEXT_FIELDS, {"blend_weight": functools.partial(_parse_auto_share, "--blend-weight")})
    config = config_from_file(TextConfig, config_file, explicit)
    _check_device(config.device)
    _refuse_earlier_run(ctx, out, force, "text model")
    train_text_model(train, out, config, unlabeled=list(unlabeled or []))


def _read_lines(stream, source: str) -> list[str]:
    """Non-blank lines of a text stream (one description each)."""
    try:
        return [line.strip() for line in stream.read().splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise MuseumError(f"{source}: not UTF-8 text (byte {exc.start}); give UTF-8 descriptions, one a line") from None


@app.command("predict-text")
@friendly_errors
def predict_text(
    texts: Optional[list[str]] = typer.Argument(
        None, metavar="TEXT", help="Descriptions; `-` reads them from standard input, one a line."),
    file: Optional[Path] = typer.Option(None, "--file", help="Also read descriptions from this UTF-8 file, one a line (blank lines skipped)."),
    model: Path = typer.Option(DEFAULT_TEXT_MODEL, "--model", help="Folder written by train-text."),
    top: int = typer.Option(3, help="How many classes to show."),
) -> None:
    """Print the most probable typologies of descriptions (given as arguments, on standard input or in a file)."""
    from museum.metrics import top_k
    from museum.text.model import TextModel

    if top < 1:
        raise MuseumError(f"--top {top}: must be at least 1")
    wanted: list[str] = []
    for text in texts or []:
        wanted += _read_lines(typer.get_text_stream("stdin", encoding="utf-8"), "standard input") if text == "-" else [text]
    if file is not None:
        if not file.is_file():
            raise MuseumError(f"--file {file}: no such file; give a text file with one description a line")
        with open(file, encoding="utf-8-sig") as f:
            wanted += _read_lines(f, str(file))
    if not wanted:
        raise MuseumError("no descriptions: give them as arguments, `-` to read standard input, or --file FILE")
    text_model = TextModel.load(model)
    for text, best in zip(wanted, top_k(text_model.predict_proba(wanted), text_model.classes_, top)):
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
    batch_size: int = FUSION.batch_size,
    workers: int = FUSION.workers,
    device: str = FUSION.device,
    chunk_size: int = FUSION.chunk_size,
) -> dict:
    """The shared cascade options as FusionConfig overrides (None = keep saved/default), checked by FusionConfig
    itself and the device by `_check_device`, before any model or row is read."""
    overrides = dict(text_threshold=text_threshold, image_threshold=image_threshold, blend_weight=blend_weight,
                     fallback=fallback, batch_size=batch_size, workers=workers, device=device, chunk_size=chunk_size)
    FusionConfig(**{k: v for k, v in overrides.items() if v is not None})
    _check_device(device)
    return overrides


@app.command("submit")
@friendly_errors
def submit_cmd(
    ctx: typer.Context,
    test_csv: Path = typer.Argument(..., metavar="TEST_CSV", help="Test CSV: guid,description[,typology]."),
    images: Optional[Path] = IMAGES_OPTION,
    text_model: str = TEXT_MODEL_OPTION,
    image_model: str = IMAGE_MODEL_OPTION,
    out: Path = typer.Option(DEFAULT_SUBMISSION, "--out", help="Submission to write, guid,typology (an earlier run's at the default is replaced only with --force)."),
    force: bool = FORCE_OPTION,
    text_threshold: Optional[float] = TEXT_THRESHOLD_OPTION,
    image_threshold: Optional[float] = IMAGE_THRESHOLD_OPTION,
    blend_weight: Optional[float] = BLEND_WEIGHT_OPTION,
    fallback: Optional[str] = FALLBACK_OPTION,
    proba: Optional[Path] = typer.Option(None, "--proba", help="Also write per-class probabilities and each row's route here."),
    settings: Optional[Path] = typer.Option(None, "--settings", help="Tuned settings (default: fusion.json beside the model folders)."),
    batch_size: int = BATCH_OPTION,
    workers: int = WORKERS_OPTION,
    device: str = DEVICE_OPTION,
    chunk_size: int = typer.Option(FUSION.chunk_size, help="Rows held in memory at a time."),
) -> None:
    """Write a submission: text when sure, else image when sure, else a blend; fallback for empty rows."""
    from museum.submit import submit

    check_out_file(out, "--out")
    if proba is not None:
        check_out_file(proba, "--proba")
    overrides = _fusion_overrides(text_threshold, image_threshold, blend_weight, fallback, batch_size, workers, device, chunk_size)
    _refuse_earlier_run(ctx, out, force, "submission")
    summary = submit(test_csv, out, images, _model_folder(text_model), _model_folder(image_model), proba, overrides, settings)
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 wrote the files and holds every rank's counts
        typer.echo(summary.format())


TUNE_FIELDS = {"text_threshold": "text_threshold", "image_threshold": "image_threshold", "blend_weight": "blend_weight",
               "fallback": "fallback", "folds": "tune_folds", "min_gain": "tune_min_gain", "seed": "seed",
               "batch_size": "batch_size", "workers": "workers", "device": "device"}


@app.command("tune")
@friendly_errors
def tune_cmd(
    ctx: typer.Context,
    valid: Optional[Path] = typer.Option(None, "--valid", help="Labelled CSV the models were not trained on (the cascade's grid is "
                                         "tuned on it; `museum split` makes one)."),
    cross_fit: Optional[Path] = typer.Option(
        None, "--cross-fit", metavar="LABELLED_CSV",
        help="Labelled CSV (rows may overlap the models' training data): retrain each expert per fold without the fold's "
        "rows, and fit the fusion (cascade, weighted or stacker) on the out-of-fold probabilities."),
    cross_fit_folds: int = typer.Option(5, help="With --cross-fit: folds (each expert is retrained once per fold)."),
    images: Optional[Path] = IMAGES_OPTION,
    text_model: str = TEXT_MODEL_OPTION,
    image_model: str = IMAGE_MODEL_OPTION,
    out: Optional[Path] = typer.Option(None, "--out", help="Settings file to write (default: fusion.json beside the model folders)."),
    config_file: Optional[Path] = CONFIG_OPTION,
    text_threshold: float = typer.Option(FUSION.text_threshold, help="Default to beat: text threshold."),
    image_threshold: float = typer.Option(FUSION.image_threshold, help="Default to beat: image threshold."),
    blend_weight: float = typer.Option(FUSION.blend_weight, help="Default to beat: text weight in the blend."),
    fallback: Optional[str] = typer.Option(None, help="Class for rows with neither modality (default: most frequent training class)."),
    folds: int = typer.Option(FUSION.tune_folds, help="Cross-validation folds that estimate the gain of tuning (config: tune_folds)."),
    min_gain: float = typer.Option(FUSION.tune_min_gain, help="Out-of-fold macro-F1 gain needed to leave the defaults (config: tune_min_gain)."),
    seed: int = typer.Option(FUSION.seed, help="Seed of the folds."),
    batch_size: int = BATCH_OPTION,
    workers: int = WORKERS_OPTION,
    device: str = DEVICE_OPTION,
) -> None:
    """Fit how the experts are combined, for macro-F1, and save it for submit, evaluate and serve (fusion.json).

    fusion.json is the models' settings: tuning again replaces it (it says when and on what it was tuned)."""
    from dataclasses import asdict

    from museum.configfile import config_from_file
    from museum.evaluate import tune, tune_cross_fit

    if (valid is None) == (cross_fit is None):
        raise MuseumError("give one of --valid (a held-out labelled CSV) or --cross-fit (any labelled CSV)")
    if cross_fit_folds < 2:
        raise MuseumError(f"--cross-fit-folds {cross_fit_folds}: must be at least 2")
    if out is not None:
        check_out_file(out, "--out")
    config = config_from_file(FusionConfig, config_file, _explicit(ctx, TUNE_FIELDS))
    _check_device(config.device)
    overrides = asdict(config)
    models = _model_folder(text_model), _model_folder(image_model)
    if cross_fit is not None:
        text = tune_cross_fit(cross_fit, images, *models, overrides, out, cross_fit_folds, config.seed)[2]
    else:
        from museum.split import warn_trained_rows

        warn_trained_rows(valid, dict(zip(("text", "image"), models)))
        text = tune(valid, images, *models, overrides, out)[2]
    typer.echo(text)


@app.command("evaluate")
@friendly_errors
def evaluate_cmd(
    labeled: Path = typer.Argument(..., metavar="LABELLED_CSV", help="Labelled CSV: guid,description,typology (rows the models "
                                   "were trained on are warned about: `museum split` makes a held-out file)."),
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
    from museum.split import warn_trained_rows

    if json_out is not None:
        check_out_file(json_out, "--json")
    if report is not None:
        check_out_folder(report, "--report")
    overrides = _fusion_overrides(text_threshold, image_threshold, blend_weight, fallback, batch_size, workers, device)
    models = _model_folder(text_model), _model_folder(image_model)
    warn_trained_rows(labeled, dict(zip(("text", "image"), models)))
    typer.echo(evaluate(labeled, images, *models, overrides, json_out, report).text)


# ----------------------------------------------------------------------------- image

IMAGE_FIELDS = {name: name for name in (
    "seed", "val_fraction", "dedup_split", "device", "backbone", "weights", "input_size", "epochs", "patience", "batch_size",
    "lr", "weight_decay", "warmup_epochs", "freeze_epochs", "trainable", "backbone_lr", "ema", "tta", "members", "mix_backbone",
    "label_smoothing", "balance", "soft_f1", "crop_scale", "color_jitter", "grayscale", "mixup", "amp", "workers", "threads", "cache_dir",
    "head", "head_features", "embeddings", "positive", "target_precision")}


@app.command("train-image")
@friendly_errors
def train_image(
    ctx: typer.Context,
    images: Path = typer.Option(..., "--images", help="DIR/<class>/*.jpg, or with --train the folder of {guid}.jpg."),
    train: Optional[Path] = typer.Option(None, "--train", help="Competition CSV (guid,description,typology) for DIR/{guid}.jpg."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation DIR/<class>/*.jpg; default: a stratified split."),
    out: Path = typer.Option(DEFAULT_IMAGE_MODEL, "--out", help="Model folder to write (an earlier run's in the default one is replaced only with --force)."),
    config_file: Optional[Path] = CONFIG_OPTION,
    force: bool = FORCE_OPTION,
    backbone: str = typer.Option(IMAGE.backbone, help="torchvision or timm model name (mobilenet_v2, resnet18, tf_efficientnet_lite0, timm:convnext_tiny, ...)."),
    weights: str = typer.Option(IMAGE.weights, help="imagenet, none, or a .pth state dict file."),
    input_size: int = typer.Option(IMAGE.input_size, help="Square input size in pixels; 0 = from the data (96 for thumbnails, else 160)."),
    epochs: int = typer.Option(IMAGE.epochs, help="Maximum epochs (early stopping on validation macro-F1); 0 = from the data size: 8..20, fewer for thousands of images on a CPU."),
    patience: int = typer.Option(IMAGE.patience, help="Epochs without improvement before stopping."),
    batch_size: int = typer.Option(IMAGE.batch_size, help="Images per step (per process under torchrun)."),
    lr: float = typer.Option(IMAGE.lr, help="AdamW peak learning rate."),
    weight_decay: float = typer.Option(IMAGE.weight_decay, help="AdamW weight decay."),
    warmup_epochs: float = typer.Option(IMAGE.warmup_epochs, help="Linear warm-up after the frozen epochs."),
    freeze_epochs: int = typer.Option(IMAGE.freeze_epochs, help="Head-only epochs before the backbone trains."),
    trainable: float = typer.Option(IMAGE.trainable, help="Share of backbone layers, from the top, that fine-tune (1 = all)."),
    backbone_lr: float = typer.Option(IMAGE.backbone_lr, help="Backbone learning rate as a share of --lr (the new head gets --lr)."),
    ema: float = typer.Option(IMAGE.ema, help="Validate and keep an average of the weights over this share of all steps; 0 = off."),
    tta: bool = typer.Option(IMAGE.tta, "--tta/--no-tta", help="Score each image and its mirror image, averaged."),
    members: int = typer.Option(IMAGE.members, help="Networks to fine-tune (seeds SEED, SEED+100, ...) and average; 0 = auto: 4 below 500 training images, else 1."),
    mix_backbone: str = typer.Option(IMAGE.mix_backbone, help="Backbone of every second ensemble member (2, 4, ...), with its own pretrained normalisation; none = all members use --backbone."),
    label_smoothing: float = typer.Option(IMAGE.label_smoothing, help="Cross-entropy label smoothing."),
    balance: str = typer.Option(IMAGE.balance, help="loss (cross-entropy weighted ∝ 1/class count, at most 10× apart), sampler (class-balanced draws) or none."),
    soft_f1: float = typer.Option(IMAGE.soft_f1, help="Weight of the soft-F1 term in the loss, 0..1."),
    crop_scale: float = typer.Option(IMAGE.crop_scale, help="Smallest area share of the random resized crop."),
    color_jitter: float = typer.Option(IMAGE.color_jitter, help="Brightness/contrast/saturation jitter, 0 = off."),
    grayscale: float = typer.Option(IMAGE.grayscale, help="Share of training images turned grey, 0..1."),
    mixup: str = typer.Option("auto", help="Share of batches trained on mixup blends of image pairs (0..1), or auto: 1 when training runs 10 epochs or more, else 0."),
    amp: bool = typer.Option(IMAGE.amp, "--amp/--no-amp", help="Mixed precision on CUDA."),
    workers: int = typer.Option(IMAGE.workers, help="Decoding processes; 0 = min(4, CPUs)."),
    threads: int = typer.Option(IMAGE.threads, help="torch CPU threads; 0 = CPUs per process."),
    cache_dir: Optional[Path] = typer.Option(None, help="Keep decoded images here, keyed by content hash and size."),
    seed: int = typer.Option(IMAGE.seed, help="One seed for the split, initialisation, sampling and augmentation."),
    device: str = DEVICE_OPTION,
    val_fraction: float = typer.Option(IMAGE.val_fraction, help="Stratified validation share when --val is not given."),
    dedup_split: bool = typer.Option(IMAGE.dedup_split, "--dedup-split", help="Keep near-duplicate images on one side of the split (no leak into validation)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT/last.pt."),
    head: str = typer.Option(IMAGE.head, help="finetune, or a scikit-learn head on frozen embeddings: logreg, svm, mlp, knn."),
    head_features: str = typer.Option(IMAGE.head_features, help="With --head: stages (several trunk stages + colour histogram) or pooled (final vector)."),
    embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="With --head: .npz from `museum embed` to reuse (written if absent or stale)."),
    positive: Optional[str] = typer.Option(None, "--positive", help="One-vs-rest: this class against all others (two-class sets: default the smaller class)."),
    target_precision: Optional[float] = typer.Option(None, help="Binary tasks: threshold = lowest reaching this validation precision (default: max F1)."),
) -> None:
    """Fine-tune an ImageNet CNN (or fit a head on its embeddings) on a folder-per-class set or the competition's photos."""
    from museum.configfile import config_from_file
    from museum.train_image import train_image_model

    explicit = _explicit(ctx, IMAGE_FIELDS, {"mixup": functools.partial(_parse_auto_share, "--mixup")})
    config = config_from_file(ImageConfig, config_file, explicit)
    if config.head != "finetune" and resume:
        raise MuseumError(f"--resume: a {config.head} head trains in one go; drop --resume")
    _check_device(config.device)
    if not resume:  # --resume continues a run that was allowed to write there when it started
        _refuse_earlier_run(ctx, out, force, "image model")
    train_image_model(config, images, out, train_csv=train, val=val, resume=resume)


@app.command("embed")
@friendly_errors
def embed_cmd(
    images: Path = typer.Argument(..., metavar="FOLDER_OR_CSV", help="DIR/<class>/*.jpg, or the competition CSV (then --images is the folder of {guid}.jpg)."),
    image_dir: Optional[Path] = typer.Option(None, "--images", help="With a CSV: folder of {guid}.jpg (default: images/ beside it)."),
    out: Path = typer.Option(Path("embeddings.npz"), "--out", help="Embeddings file to write (reused as is when up to date)."),
    backbone: str = typer.Option(IMAGE.backbone, help="torchvision or timm model name (as train-image --backbone)."),
    weights: str = typer.Option("imagenet", help="imagenet or a .pth state dict file."),
    input_size: int = typer.Option(0, help="Square input size; 0 = as train-image picks (96 for thumbnails, else 160)."),
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
    _check_device(device)
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
    _check_device(device)
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
    _check_device(device)
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
    ctx: typer.Context,
    path: Path = typer.Argument(..., metavar="CSV_OR_FOLDER", help="Competition CSV (guid,description[,typology]) or DIR/<class>/*.jpg."),
    images: Optional[Path] = typer.Option(None, "--images", help="With a CSV: folder of {guid}.jpg (default: images/ beside the CSV, if there is one)."),
    stats: bool = typer.Option(False, "--stats", help="Also write per-channel mean/std (channel_stats.json) for train-image."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for eda.html, eda.json and the figures (default: reports/eda-NAME)."),
    force: bool = FORCE_OPTION,
) -> None:
    """Analyse a dataset: classes, imbalance, description lengths, duplicates, image sizes, unreadable files."""
    from museum.reports.eda import run_eda

    if not path.exists():
        raise MuseumError(f"{path}: not found; give a competition CSV or a folder of class sub-folders")
    check_not_input(out, [path, images], folder=True)
    if out is None:
        out = default_report_folder("eda", path)
        _refuse_earlier_run(ctx, out, force, "analysis")
    typer.echo(run_eda(path, images, stats, out).text)


# ----------------------------------------------------------------------------- data cleaning


@app.command("clean")
@friendly_errors
def clean_cmd(
    ctx: typer.Context,
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
    force: bool = FORCE_OPTION,
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
    if out is None and (train or images) is not None:
        out = default_report_folder("clean", train or images)
        if not reuse:  # --reuse reads the earlier audit there and writes its pages again
            _refuse_earlier_run(ctx, out, force, "audit")
    typer.echo(run_clean(train, images, out, folds, seed, expert, action, reuse, top, embeddings).text)


@app.command("dedup")
@friendly_errors
def dedup_cmd(
    ctx: typer.Context,
    path: Path = typer.Argument(..., metavar="FOLDER_OR_CSV", help="Image folder (DIR/<class>/*.jpg or DIR/*.jpg) or a competition CSV."),
    images: Optional[Path] = typer.Option(None, "--images", help="With a CSV: folder of {guid}.jpg (without it, only descriptions are compared)."),
    threshold: Optional[float] = typer.Option(None, help="Cosine similarity of embeddings from which two images are near duplicates on that alone (default 0.96); from 0.6 up, a matching centre-crop hash also makes them duplicates."),
    keep: str = typer.Option("all", help="all (report only) or one (also write a list/CSV keeping one item per group)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for groups.csv and dedup.html (default reports/dedup-NAME)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (for the embeddings; checked before any data is read)."),
    embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="A `museum embed --features pooled` file of these images, read instead of embedding them again."),
    force: bool = FORCE_OPTION,
) -> None:
    """Find exact, near-duplicate and same-description groups; optionally keep one item per group."""
    from museum.dedup import DEFAULT_THRESHOLD, KEEP, run_dedup

    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise MuseumError(f"--threshold {threshold}: must be in (0, 1]")
    if keep not in KEEP:
        raise MuseumError(f"--keep {keep}: expected one of {', '.join(KEEP)}")
    check_not_input(out, [path, images, embeddings], folder=True)
    _check_device(device)
    if out is None:
        out = default_report_folder("dedup", path)
        _refuse_earlier_run(ctx, out, force, "duplicate search")
    typer.echo(run_dedup(path, images, out, DEFAULT_THRESHOLD if threshold is None else threshold, keep, device,
                         embeddings).text)


@app.command("split")
@friendly_errors
def split_cmd(
    ctx: typer.Context,
    labelled: Path = typer.Argument(..., metavar="LABELLED_CSV", help="Labelled competition CSV: guid,description,typology."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of {guid}.jpg whose near-duplicates are kept together "
                                          "too (default: images/ beside the CSV, if there is one)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for train.csv, valid.csv and images/ (a link): the competition "
                                       "layout (default splits/NAME)."),
    force: bool = FORCE_OPTION,
    val_fraction: float = typer.Option(0.2, help="Share of each class that goes to valid.csv (up to the groups kept whole)."),
    seed: int = typer.Option(0, min=0, help="Seed of the draw."),
    threshold: Optional[float] = typer.Option(None, help="Cosine similarity from which two images are near duplicates (default 0.96, as dedup)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (for the image embeddings; checked before any data is read)."),
) -> None:
    """Split a labelled CSV into train.csv and valid.csv: stratified, seeded, and with no description or near-duplicate
    image on both sides, so that evaluate and tune --valid score rows the models never saw."""
    from museum.split import split_csv

    _check_device(device)
    if out is None:
        out = Path("splits") / f"{labelled.parent.name}-{labelled.stem}" if labelled.parent.name else Path("splits") / labelled.stem
        _refuse_earlier_run(ctx, out, force, "split")
    typer.echo(split_csv(labelled, out, images, val_fraction, seed, threshold, device).text)


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
