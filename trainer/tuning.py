"""Hyperparameter search on validation: coordinate ascent over a small grid.

Start from a point, then for each parameter in turn try its other grid values with the rest held at
the best point so far, and move wherever validation improves. A few runs per parameter instead of
the grid's product; every choice is made on the validation score, never on test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

Result = TypeVar("Result")


@dataclass
class Trial(Generic[Result]):
    """One run of the search: the full point it trained, its validation score and what the run returned."""

    point: dict[str, Any]
    score: float
    result: Result


@dataclass
class Search(Generic[Result]):
    """Every trial in the order run, and the best one (the first of equal scores)."""

    trials: list[Trial[Result]] = field(default_factory=list)

    @property
    def best(self) -> Trial[Result]:
        return max(self.trials, key=lambda t: t.score)  # max keeps the first of equal scores


def coordinate_search(
    start: Mapping[str, Any], grid: Mapping[str, Sequence[Any]],
    run: Callable[[dict[str, Any]], tuple[float, Result]], max_trials: int | None = None,
) -> Search[Result]:
    """Coordinate ascent from `start` over `grid` (parameter -> values, in the order searched);
    `run(point)` trains one point and returns (validation score, anything to keep). The start is
    always run; after that at most max_trials - 1 more runs (None: the whole pass). A point is never
    run twice."""
    unknown = set(grid) - set(start)
    if unknown:
        raise ValueError(f"grid parameters {sorted(unknown)} have no start value")
    if max_trials is not None and max_trials < 1:
        raise ValueError(f"max_trials must be at least 1, got {max_trials}")
    search: Search[Result] = Search()
    tried: set[tuple] = set()

    def attempt(point: dict[str, Any]) -> None:
        tried.add(tuple(sorted(point.items())))
        score, result = run(point)
        search.trials.append(Trial(point, score, result))

    attempt(dict(start))
    for name, values in grid.items():
        centre = dict(search.best.point)
        for value in values:
            point = {**centre, name: value}
            if tuple(sorted(point.items())) in tried:
                continue
            if max_trials is not None and len(search.trials) >= max_trials:
                return search
            attempt(point)
    return search
