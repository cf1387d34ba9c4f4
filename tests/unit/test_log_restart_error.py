"""A log that restarts under a running pipeline ends the run with one line, not a runner's stack trace:
the error a DoFn raises comes out of a real Beam run wrapped, and the pipeline finds it again."""

from __future__ import annotations

import apache_beam as beam
import pytest

from ingest.epochs import LogRestartedError
from ingest.pipeline import log_restart_in, pipeline_options

pytestmark = pytest.mark.unit

MESSAGE = ("The log of plum.events[0] restarted under the running pipeline (the broker returned offset 0, below "
           "the read position 40); restart the pipeline: it reads the new log from its start as a new log epoch.")


class _Restarts(beam.DoFn):
    def process(self, element):
        raise LogRestartedError(MESSAGE)


def test_the_runner_wrapped_log_restart_is_found_with_its_message():
    with pytest.raises(Exception) as raised:
        with beam.Pipeline(options=pipeline_options("DirectRunner", streaming=False)) as pipeline:
            _ = pipeline | beam.Create([1]) | beam.ParDo(_Restarts())
    found = log_restart_in(raised.value)
    assert isinstance(found, LogRestartedError) and str(found) == MESSAGE


def test_other_failures_are_not_taken_for_a_log_restart():
    assert log_restart_in(RuntimeError("a bug in a DoFn")) is None
    try:
        try:
            raise LogRestartedError(MESSAGE)
        except LogRestartedError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert str(log_restart_in(outer)) == MESSAGE
