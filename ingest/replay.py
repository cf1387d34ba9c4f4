"""Replay a data set into Kafka: item upserts first, then events in event-time order.

`speed` is a multiple of real time (speed=3600 plays an hour of events per second); None
replays as fast as the producer goes. Event ids are stable, so replaying twice produces
duplicates that the pipeline counts once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

from ingest.events import EngagementEvent, ItemUpsert
from ingest.producer import EventProducer


@dataclass
class ReplayResult:
    items: int
    events: int
    seconds: float

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def replay(
    producer: EventProducer,
    items: Iterable[ItemUpsert],
    events: Iterable[EngagementEvent],
    speed: float | None = None,
    on_progress: Callable[[int], None] | None = None,
    progress_every: int = 1000,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ReplayResult:
    """Send `items`, flush, then `events` paced by their event times; returns what was sent."""
    if speed is not None and speed <= 0:
        raise ValueError("speed must be positive (a multiple of real time), or None for as fast as possible")
    started = clock()
    n_items = 0
    for item in items:
        producer.send_item(item)
        n_items += 1
    producer.flush()
    n_events = 0
    first_event_time: float | None = None
    wall_start = clock()
    for event in events:
        if speed is not None:
            event_ts = event.event_time.timestamp()
            if first_event_time is None:
                first_event_time = event_ts
            due = wall_start + (event_ts - first_event_time) / speed
            delay = due - clock()
            if delay > 0:
                sleep(delay)
        producer.send_event(event)
        n_events += 1
        if on_progress is not None and n_events % progress_every == 0:
            on_progress(progress_every)
    producer.flush()
    if on_progress is not None and n_events % progress_every:
        on_progress(n_events % progress_every)
    return ReplayResult(n_items, n_events, clock() - started)
