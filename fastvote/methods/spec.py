"""Typed method options, declared once per method, and the parsed spec every
caller uses (prune, the experiment, the CLI, the report's labels).

A method module declares ``OPTIONS = (Option(...), ...)`` and may declare
``check(options)`` for rules between options. :func:`parse` takes the method
string (``"fm:metric=cosine,k=3"``) plus options given as arguments and
returns a :class:`MethodSpec` whose ``options`` are exactly what the method
will use, defaults filled in; an option the method does not take is an error
naming it, the method and what it takes. Values are type-checked: a bool is a
bool, an int is not a float, a choice is one of its choices.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass(frozen=True)
class Option:
    """One option of a method: name, type (bool, int, float or str), default
    (None: decided at run time, e.g. "the number of source classes"), a one-line
    doc, the allowed choices (str) or the smallest allowed value (int, float).
    `high` is an exclusive upper bound for floats (beta < 1). `flag`: the
    command line's spelling when ``--name`` will not do (default ``--name``)."""

    name: str
    type: type
    default: Any
    doc: str
    choices: Tuple[str, ...] = ()
    low: Optional[float] = None
    high: Optional[float] = None
    flag: Optional[str] = None

    def _expected(self) -> str:
        if self.choices:
            return f"one of {list(self.choices)}"
        bounds = ([f">= {self.low:g}"] if self.low is not None else []) + (
            [f"< {self.high:g}"] if self.high is not None else [])
        kind = f"{'an' if self.type is int else 'a'} {self.type.__name__}"
        return kind + (f" {' and '.join(bounds)}" if bounds else "")

    def check(self, method: str, value: Any) -> Any:
        """`value` as this option's type, or ValueError naming method, option, value and what is expected."""
        def bad(why: str = ""):
            return ValueError(f"method={method!r}: {self.name}={value!r} is invalid{why}; expected "
                              f"{self._expected()} ({self.doc})")

        if value is None and self.default is None:
            return None
        if (self.type is str and isinstance(value, numbers.Integral) and not isinstance(value, bool)
                and str(value) in self.choices):
            value = str(value)  # a choice that names a number may be given as one: p=2 is "2"
        if self.type is bool:
            if not isinstance(value, bool):
                raise bad()
            return value
        if isinstance(value, bool) or (self.type is str) != isinstance(value, str):
            raise bad()
        if self.type is int:
            if isinstance(value, float) or not hasattr(value, "__index__"):
                raise bad()
            value = int(value)
        elif self.type is float:
            value = float(value)
            if not math.isfinite(value):
                raise bad()
        if self.choices and value not in self.choices:
            raise bad()
        if self.low is not None and value < self.low or self.high is not None and value >= self.high:
            raise bad()
        return value

    def parse(self, method: str, text: str) -> Any:
        """A value written as text (``key=value`` in a method string, the CLI)."""
        text = text.strip()
        if self.type is str:
            return self.check(method, text)
        try:
            if self.type is bool:
                if text.lower() not in _TRUE + _FALSE:
                    raise ValueError
                return text.lower() in _TRUE
            if self.default is None and text.lower() == "none":
                return None
            value = self.type(text)
        except ValueError:
            raise ValueError(f"method={method!r}: option {self.name}={text!r} is not {self._expected()} "
                             f"({self.doc})") from None
        return self.check(method, value)


@dataclass(frozen=True)
class MethodSpec:
    """A method with its options resolved: what prune() runs and records.

    name: the registry name ("fm"); options: every option the method takes,
    with the value it will use; given: the names set by the caller (in the
    string or as arguments), which make its canonical text; extra: options the
    caller declared for itself (the experiment's ablations), not the method's.
    """

    name: str
    module: Any
    options: Mapping[str, Any]
    given: Tuple[str, ...]
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def class_wise(self) -> bool:
        return bool(self.module.CLASS_WISE)

    @property
    def unit(self) -> str:
        """What keep= counts and ratio= removes: "classes" or "samples"."""
        return "classes" if self.class_wise else "samples"

    @property
    def needs(self) -> Mapping[str, Tuple[str, ...]]:
        """Surrogate outputs the method reads: {"source": (...), "target": (...)}."""
        return self.module.NEEDS

    @property
    def uses_surrogate(self) -> bool:
        return any(self.needs[side] for side in ("source", "target"))

    @property
    def text(self) -> str:
        """Canonical "name:key=value,..." of the given options (and extras)."""
        items = [f"{k}={_text(self.options[k])}" for k in self.given]
        items += [f"{k}={_text(v)}" for k, v in self.extra.items()]
        return self.name + (":" + ",".join(items) if items else "")

    @property
    def label(self) -> str:
        """The name people read in tables and legends: "LM", "LM (reverse=true)", "Grand (runs=2)"."""
        options = self.text.partition(":")[2]
        return display_name(self.name) + (f" ({options})" if options else "")

    def select(self, source, targets: Sequence, *, keep: int, seed: int, device=None, progress: bool = True):
        return self.module.select(source, targets, keep=keep, seed=seed, device=device, progress=progress,
                                  **self.options)


DISPLAY = {"lm": "LM", "fm": "FM", "normsim": "NormSim"}


def display_name(name: str) -> str:
    """A registry name as tables show it: "lm" -> "LM", "fm+normsim" -> "FM+NormSim", "grand" -> "Grand"."""
    return "+".join(DISPLAY.get(part, part.capitalize()) for part in name.split("+"))


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse(method, given: Optional[Mapping[str, Any]] = None, *, defaults: Optional[Mapping[str, Any]] = None,
          extra: Sequence[Option] = (), registry: Optional[Mapping[str, Any]] = None) -> MethodSpec:
    """The spec of `method` ("name" or "name:key=value,...").

    given: options set as arguments (None values are "not given"); one also in
        the string must agree with it. An option the method lacks is an error.
    defaults: values that replace the method's defaults where it HAS that
        option and nobody gave it (the experiment's global k, metric, ...).
    extra: options the caller takes off the string for itself (returned in
        ``spec.extra``, never passed to the method).
    """
    from fastvote.methods import METHODS

    registry = METHODS if registry is None else registry
    if isinstance(method, MethodSpec):  # already parsed: options given now must agree with it
        if all(value is None or method.options.get(key, object()) == value for key, value in (given or {}).items()):
            return method
        method = method.text
    if not isinstance(method, str):
        raise TypeError(f"method={method!r} has type {type(method).__name__}; expected a method name such as "
                        f"'lm' or 'fm:metric=cosine' (one of {sorted(registry)})")
    base, colon, body = method.partition(":")
    base = base.strip().lower()  # "LM" is lm
    if base not in registry:
        raise ValueError(f"method={method!r} is unknown; expected one of {sorted(registry)}, optionally with "
                         "options as 'name:key=value,...'")
    module = registry[base]
    own: Dict[str, Option] = {o.name: o for o in module.OPTIONS}
    theirs: Dict[str, Option] = {o.name: o for o in extra}

    def unknown(key: str) -> ValueError:
        takes = sorted(own) or "no options"
        return ValueError(f"method={method!r}: {base} does not use {key!r}; it takes {takes}"
                          + (f" (and the caller's {sorted(theirs)})" if theirs else ""))

    values: Dict[str, Any] = {}
    extras: Dict[str, Any] = {}
    if colon:
        if not body.strip():
            raise ValueError(f"method={method!r}: nothing after ':'; expected key=value options")
        for item in body.split(","):
            key, eq, text = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ValueError(f"method={method!r}: option {item!r} is malformed; expected key=value")
            if key in values or key in extras:
                raise ValueError(f"method={method!r}: option {key!r} is given twice")
            if key in own:
                values[key] = own[key].parse(method, text)
            elif key in theirs:
                extras[key] = theirs[key].parse(method, text)
            else:
                raise unknown(key)
    for key, value in (given or {}).items():
        if value is None:
            continue
        if key not in own:
            raise unknown(key)
        value = own[key].check(base, value)
        if key in values and values[key] != value:
            raise ValueError(f"method={method!r} sets {key}={_text(values[key])} but {key}={_text(value)} is "
                             "also given; give it once")
        values[key] = value
    given_names = tuple(k for k in own if k in values)
    for key, value in (defaults or {}).items():
        if key in own and key not in values and value is not None:
            values[key] = own[key].check(base, value)
    options = {k: values.get(k, own[k].default) for k in own}
    check = getattr(module, "check", None)
    if check is not None:
        check(method, options, given_names)
    return MethodSpec(name=base, module=module, options=MappingProxyType(options), given=given_names,
                      extra=MappingProxyType(extras))


def only_with(method: str, options: Mapping[str, Any], given: Sequence[str], names: Sequence[str],
              condition: str, holds: bool) -> None:
    """Rejects options in `names` that the caller gave when they would not be
    used (`holds` is False): "num_clusters is only used with centroids='kmeans'"."""
    idle = [n for n in names if n in given]
    if idle and not holds:
        raise ValueError(f"method={method!r}: {', '.join(f'{n}={_text(options[n])}' for n in idle)} "
                         f"{'is' if len(idle) == 1 else 'are'} only used with {condition}")


__all__ = ["MethodSpec", "Option", "display_name", "only_with", "parse"]
