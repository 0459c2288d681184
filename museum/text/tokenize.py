"""Tokenizer for Russian museum-catalogue descriptions.

Catalogue text is short and formulaic («Монета. 2 копейки. 1789 г.», «Фото. Иванов И.И.»):
the tokenizer lower-cases, folds «ё» into «е», keeps common abbreviations with their dot
(«г.», «вв.», «худ.») as single tokens, keeps «№», and replaces numbers by their shape
(a 4-digit year carries era information; other numbers rarely do).
"""

from __future__ import annotations

import re
from functools import lru_cache

# Abbreviations frequent in catalogue text; kept with the dot so «г.» (year) ≠ «г» (letter).
ABBREVIATIONS = frozenset(
    "г гг в вв н э см мм кг гр ед хр худ изд им ул д т тт с стр илл ил экз инв арх кол коп руб".split()
)
YEAR_TOKEN = "<year>"
NUMBER_TOKEN = "<num>"

_TOKEN = re.compile(r"№|\d+(?:[.,]\d+)?|[^\W\d_]+(?:-[^\W\d_]+)*\.?", re.UNICODE)


def normalise(text: str) -> str:
    return text.lower().replace("ё", "е")


def tokenize(text: str) -> list[str]:
    """Split a description into tokens.

    >>> tokenize("Монета. 2 копейки. 1789 г. № 5")
    ['монета', '<num>', 'копейки', '<year>', 'г.', '№', '<num>']
    """
    tokens = []
    for match in _TOKEN.finditer(normalise(text)):
        token = match.group()
        if token[0].isdigit():
            digits = token.replace(",", ".").split(".")[0]
            tokens.append(YEAR_TOKEN if len(digits) == 4 and token.isdigit() else NUMBER_TOKEN)
        elif token.endswith("."):
            word = token[:-1]
            tokens.append(token if word in ABBREVIATIONS else word)
        else:
            tokens.append(token)
    return tokens


class Lemmatizer:
    """pymorphy3 normal forms with a per-word cache (catalogue vocabularies are small)."""

    def __init__(self) -> None:
        from museum.extras import require

        self._morph = require("pymorphy3", "lemmatize").MorphAnalyzer()

    @lru_cache(maxsize=200_000)
    def lemma(self, token: str) -> str:
        if token.startswith("<") or token.endswith(".") or not token.isalpha():
            return token
        return self._morph.parse(token)[0].normal_form.replace("ё", "е")

    def __call__(self, tokens: list[str]) -> list[str]:
        return [self.lemma(t) for t in tokens]


class Tokenizer:
    """`tokenize`, optionally followed by lemmatization; picklable settings only."""

    def __init__(self, lemmatize: bool = False) -> None:
        self.lemmatize = lemmatize
        self._lemmatizer = Lemmatizer() if lemmatize else None

    def __call__(self, text: str) -> list[str]:
        tokens = tokenize(text)
        return self._lemmatizer(tokens) if self._lemmatizer else tokens
