"""The registry of relevance measures: every module in this package that defines `MEASURE`.

A measure says how much each transformer block matters (higher = matters more).
Each lives in one module of this package and declares a `Measure`: its name,
its label in tables and figures, what it needs (calibration texts, evaluation
tasks) and the function that ranks. The CLI's choices, recipe validation, the
reports, the cards and the figure all read this registry, so a new measure is
one new module (plus its tests) and nothing else.

Importing the registry imports no torch: measure modules import their heavy
dependencies inside their ranking functions.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from prune.errors import PruneError
from prune.measures.base import LayerScore, Measure, Ranking, RankRequest, adaptive_rounds

__all__ = [
    "LayerScore",
    "Measure",
    "RankRequest",
    "Ranking",
    "adaptive_rounds",
    "get_measure",
    "measure_names",
    "rank_layers",
    "registry",
]

_NOT_MEASURES = {"base"}


@functools.cache
def registry() -> dict[str, Measure]:
    """Every registered measure by name, in a stable order (each measure's `order`, then name).

    Cached: call `registry.cache_clear()` after adding a module at run time (tests do).
    """
    found: list[Measure] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_MEASURES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        measure = getattr(module, "MEASURE", None)
        if isinstance(measure, Measure):
            found.append(measure)
    found.sort(key=lambda m: (m.order, m.name))
    names = [m.name for m in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PruneError(f"measure name declared by two modules: {', '.join(twice)}")
    return {m.name: m for m in found}


def measure_names() -> tuple[str, ...]:
    """The names users may pass (`--metric`, recipe `strategies`)."""
    return tuple(registry())


def get_measure(name: str) -> Measure:
    """The measure called `name`; PruneError naming the accepted ones otherwise."""
    try:
        return registry()[name]
    except KeyError:
        raise PruneError(
            f"unknown measure '{name}' (accepted: {', '.join(measure_names())})"
        ) from None


def rank_layers(name: str, request: RankRequest) -> Ranking:
    """Rank the blocks of `request.loaded` by the measure called `name` (see `RankRequest`)."""
    return get_measure(name).rank(request)
