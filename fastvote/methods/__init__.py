"""Pruning methods, one module each with one interface: ``select(source,
targets, *, keep=..., ...) -> Selection`` plus ``CLASS_WISE`` and ``NEEDS``
(which surrogate outputs it reads from the source and the targets). Adding a
method touches its module and one line of METHODS."""
from __future__ import annotations

from types import ModuleType
from typing import Dict

from fastvote.methods import fm, lm, random
from fastvote.methods.base import Selection, View

METHODS: Dict[str, ModuleType] = {"lm": lm, "fm": fm, "random": random}


def get(name: str) -> ModuleType:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method='{name}' is unknown; expected one of {sorted(METHODS)}") from None


__all__ = ["METHODS", "Selection", "View", "get"]
