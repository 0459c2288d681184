"""User-facing errors: the CLI prints their message on one line, never a traceback."""


class MuseumError(Exception):
    """A problem with the user's input (file, row, field) and what to do about it."""


def load_failure(exc: BaseException) -> str:
    """Why a model or array file would not load, in a few words (library messages run to paragraphs,
    and numpy's even suggests unpickling, which this package never does with files it did not write)."""
    text = str(exc)
    if "Weights only load failed" in text or type(exc).__name__ == "UnpicklingError":
        return "not a plain-tensor torch file: foreign or damaged (pickled objects are never loaded)"
    if "allow_pickle" in text:
        return "holds pickled objects, which are never loaded"
    if "Error(s) in loading state_dict" in text:
        detail = next((line.strip() for line in text.splitlines()[1:] if line.strip()), "")
        return f"its tensors do not fit the network ({detail[:120]})"
    if "PytorchStreamReader" in text or type(exc).__name__ in ("BadZipFile", "EOFError"):
        return "damaged or not a torch/numpy file"
    first = (text.strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:100]}" if first else type(exc).__name__
