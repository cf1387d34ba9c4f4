"""Coordinate search: moves one parameter at a time to the best validation score, never repeats a point."""

import pytest

from trainer.tuning import coordinate_search

pytestmark = pytest.mark.unit


def test_coordinate_search_finds_the_separable_optimum_and_keeps_every_trial():
    runs = []

    def run(point):
        runs.append(dict(point))
        # best at a=3, b="y"; separable, so one pass finds it
        return -abs(point["a"] - 3) + (1.0 if point["b"] == "y" else 0.0), point["a"] * 10

    search = coordinate_search({"a": 1, "b": "x"}, {"a": [1, 2, 3], "b": ["x", "y"]}, run)
    assert search.best.point == {"a": 3, "b": "y"} and search.best.result == 30
    assert runs == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}, {"a": 3, "b": "x"}, {"a": 3, "b": "y"}]
    assert [t.point for t in search.trials] == runs


def test_coordinate_search_stops_at_max_trials_and_keeps_the_first_of_equal_scores():
    search = coordinate_search({"a": 0}, {"a": [1, 2, 3]}, lambda p: (0.0, None), max_trials=2)
    assert [t.point for t in search.trials] == [{"a": 0}, {"a": 1}]
    assert search.best.point == {"a": 0}


def test_grid_parameter_without_a_start_is_a_value_error():
    with pytest.raises(ValueError, match="no start value"):
        coordinate_search({"a": 0}, {"b": [1]}, lambda p: (0.0, None))
