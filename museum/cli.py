"""The `museum` command line: each command validates its options, builds a config and calls
one library function. Errors in the user's input print one line and exit with status 2."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from museum import __version__
from museum.errors import MuseumError
from museum.log import setup_logging

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Tell a museum item's typology from its photo, its Russian description, or both.",
)

DEFAULT_TEXT_MODEL = Path("models/text")
DEFAULT_IMAGE_MODEL = Path("models/image")


def friendly_errors(fn: Callable) -> Callable:
    """Turn `MuseumError` (and Ctrl-C) into one line on stderr instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MuseumError as exc:
            typer.echo(f"error: {exc}", err=True)
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


# ----------------------------------------------------------------------------- text


@app.command("train-text")
@friendly_errors
def train_text(
    train: Path = typer.Option(..., "--train", help="Labelled CSV: guid,description,typology."),
    unlabeled: Optional[list[Path]] = typer.Option(
        None, "--unlabeled", help="Extra CSV(s) whose descriptions also train Word2Vec (e.g. test.csv)."
    ),
    out: Path = typer.Option(DEFAULT_TEXT_MODEL, "--out", help="Model folder to write."),
    epochs: int = typer.Option(15, help="Maximum BiLSTM epochs (early stopping on validation macro-F1)."),
    patience: int = typer.Option(4, help="Epochs without improvement before stopping."),
    seed: int = typer.Option(0, help="One seed for the split, Word2Vec, torch and sklearn."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    val_fraction: float = typer.Option(0.2, help="Stratified validation share."),
    lemmatize: bool = typer.Option(False, "--lemmatize/--no-lemmatize", help="Lemmatize tokens with pymorphy3."),
    navec: bool = typer.Option(True, "--navec/--no-navec", help="Warm-start Word2Vec from navec vectors."),
    tfidf: bool = typer.Option(True, "--tfidf/--no-tfidf", help="Blend in the TF-IDF linear expert."),
    blend_weight: Optional[float] = typer.Option(
        None, help="LSTM weight in the blend (0..1); default: chosen on validation."
    ),
    batch_size: int = typer.Option(64, help="BiLSTM batch size."),
    hidden: int = typer.Option(128, help="BiLSTM hidden units per direction."),
    lr: float = typer.Option(2e-3, help="AdamW learning rate."),
) -> None:
    """Train the text expert (Word2Vec + BiLSTM, blended with TF-IDF) on descriptions."""
    from museum.config import TextConfig
    from museum.text.train import train_text_model

    if blend_weight is not None and not 0.0 <= blend_weight <= 1.0:
        raise MuseumError(f"--blend-weight {blend_weight}: must be between 0 and 1")
    if epochs < 1:
        raise MuseumError(f"--epochs {epochs}: must be at least 1")
    config = TextConfig(
        seed=seed, val_fraction=val_fraction, device=device, lemmatize=lemmatize, navec=navec,
        epochs=epochs, patience=patience, batch_size=batch_size, hidden=hidden, lr=lr,
        tfidf=tfidf, blend_weight=blend_weight,
    )
    train_text_model(train, out, config, unlabeled=list(unlabeled or []))


@app.command("predict-text")
@friendly_errors
def predict_text(
    texts: list[str] = typer.Argument(..., help="One or more descriptions."),
    model: Path = typer.Option(DEFAULT_TEXT_MODEL, "--model", help="Folder written by train-text."),
    top: int = typer.Option(3, help="How many classes to show."),
) -> None:
    """Print the most probable typologies of descriptions."""
    from museum.metrics import top_k
    from museum.text.model import TextModel

    text_model = TextModel.load(model)
    for text, best in zip(texts, top_k(text_model.predict_proba(texts), text_model.classes_, top)):
        typer.echo(text)
        for label, p in best:
            typer.echo(f"  {p:6.3f}  {label}")
