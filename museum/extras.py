"""Optional dependencies: each lives in an extra of the package (pyproject.toml), needed by one command only.

`require(module, extra)` imports it, or stops with one line naming the extra that brings it,
so a plain `pip install museum` works for everything else and says what to add when asked for more.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from museum.errors import MuseumError

# extra → what needs it (for messages and `museum doctor`)
EXTRAS = {
    "serve": "museum serve",
    "clean": "museum clean (cleanlab)",
    "lemmatize": "--lemmatize (pymorphy3)",
    "export": "ONNX export (onnx, onnxruntime)",
}


def install_hint(extra: str) -> str:
    return f"pip install 'museum[{extra}]' (in a clone: pip install -e '.[{extra}]')"


def require(module: str, extra: str) -> ModuleType:
    """`module` imported, or a MuseumError line: which extra of museum to install for it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or module
        raise MuseumError(f"{EXTRAS.get(extra, extra)} needs {missing}, which is not installed: "
                          f"{install_hint(extra)}") from None
