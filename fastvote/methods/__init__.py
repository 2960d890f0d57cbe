"""Pruning methods, one module each with one interface: ``select(source,
targets, *, keep=..., ...) -> Selection`` plus ``CLASS_WISE`` and ``NEEDS``
(which surrogate outputs it reads from the source and the targets). Adding a
method touches its module and one line of METHODS.

Class-wise methods (lm, fm, random) keep whole classes: ``keep`` counts
classes and prune's ``ratio`` is the fraction of source classes removed.
Sample-wise baselines (random-sample, moderate, grand, el2n, forgetting, ccs,
ssp) keep samples: ``keep`` counts samples and ``ratio`` is the fraction of
source SAMPLES removed.

A method's own options (each module's ``OPTIONS``) ride on its name, so the
CLI and the experiment reach them through the one ``method`` string:
``"ssp:keep_hard=false"``, ``"ccs:score=forgetting,beta=0.2"``,
``"grand:runs=4,epoch=1"``. :func:`get` parses and checks them.
"""
from __future__ import annotations

import functools
from types import ModuleType, SimpleNamespace
from typing import Dict, Union

from fastvote.methods import ccs, el2n, fm, forgetting, grand, lm, moderate, random, ssp
from fastvote.methods.base import Selection, View

METHODS: Dict[str, Union[ModuleType, SimpleNamespace]] = {
    "lm": lm, "fm": fm, "random": random,
    "random-sample": random.sample_wise,
    "moderate": moderate, "grand": grand, "el2n": el2n, "forgetting": forgetting, "ccs": ccs, "ssp": ssp,
}

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_option(method: str, key: str, text: str, kind: type):
    """One ``key=value`` option of `method` as `kind` (bool accepts true/false/1/0/yes/no)."""
    try:
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        return kind(text)
    except ValueError:
        raise ValueError(f"method={method!r}: option {key}={text!r} is not a valid {kind.__name__}") from None


def get(name: str):
    """The method for `name`: a registry name, optionally followed by
    ``:key=value,key=value`` options of that method (its OPTIONS). Returns
    the module, or with options an object with the same interface whose
    select has them bound."""
    base, _, spec = str(name).partition(":")
    try:
        module = METHODS[base]
    except KeyError:
        raise ValueError(f"method='{name}' is unknown; expected one of {sorted(METHODS)}, optionally with "
                         f"options as 'name:key=value,...'") from None
    if not spec:
        return module
    allowed = getattr(module, "OPTIONS", {})
    options = {}
    for item in spec.split(","):
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"method={name!r}: option {item!r} is malformed; expected key=value")
        if key not in allowed:
            raise ValueError(f"method={name!r}: {base} has no option {key!r}; expected one of {sorted(allowed)}"
                             + (" (its other arguments are fastvote.prune's)" if not allowed else ""))
        if key in options:
            raise ValueError(f"method={name!r}: option {key!r} is given twice")
        options[key] = parse_option(name, key, text.strip(), allowed[key])
    return SimpleNamespace(__name__=f"{module.__name__}[{spec}]", __doc__=module.__doc__,
                           CLASS_WISE=module.CLASS_WISE, NEEDS=module.NEEDS, OPTIONS=allowed,
                           select=functools.partial(module.select, **options), options=options)


__all__ = ["METHODS", "Selection", "View", "get", "parse_option"]
