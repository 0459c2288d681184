"""museum: tell the typology of a museum item from its photo, its description, or both.

From Python: `from museum import Predictor` (the `museum submit` cascade over a DataFrame), or the
experts themselves, `museum.text.model.TextModel` (a scikit-learn classifier) and `museum.image.model.ImageModel`.
"""

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__"]


def __getattr__(name: str):
    # Imported on first use: `import museum` (and every CLI start) stays free of torch and pandas.
    if name == "Predictor":
        from museum.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'museum' has no attribute {name!r}")
