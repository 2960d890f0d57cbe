"""The process's random generators as the caller left them. fastvote's
training seeds python's, numpy's and torch's generators every epoch (so a run
is reproducible and a resumed one equals an uninterrupted one); the program
that called fastvote gets its generators back untouched (:func:`keeps_rng`).

This module imports nothing from fastvote (every layer may use it).
"""
from __future__ import annotations

import copy
import functools
import random
from typing import Any, Callable, Dict

import numpy as np
import torch


def rng_state() -> Dict[str, Any]:
    """python's, numpy's, torch's and (if initialised) CUDA's generator states, as a
    ``torch.load(weights_only=True)``-loadable dict: what a resumable state saves so
    that fastvote.train.resume leaves the generators as an uninterrupted run would."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # weights_only-loadable
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = copy.deepcopy(state["numpy"])
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def keeps_rng(fn: Callable) -> Callable:
    """Gives the caller's python, numpy, torch (and CUDA) generators back as
    they were, however `fn` ends: training seeds them every epoch (the run is
    reproducible), which must not reseed the program that called fastvote."""
    @functools.wraps(fn)
    def call(*args, **kw):
        state = rng_state()
        try:
            return fn(*args, **kw)
        finally:
            set_rng_state(state)
    return call
