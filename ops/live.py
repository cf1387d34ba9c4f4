"""Live traffic for the running loop: recorded events sent as if they happened now.

A data set's later events are sent at a fixed rate, each re-timed to its send time, so they are
the newest events the loop has seen (the main job and `plum bench freshness` both do this).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import datetime, timezone

from ingest.events import EngagementEvent
from ingest.producer import EventProducer
from ops.config import PlumConfig
from ops.errors import PlumError


class LiveReplay(threading.Thread):
    """Sends events at a fixed rate (events/s), each re-timed to its send time; the first `probes`
    have their send times recorded (by event id, and in order per user)."""

    def __init__(self, cfg: PlumConfig, events: list[EngagementEvent], rate: float, probes: int = 0) -> None:
        super().__init__(daemon=True)
        self.cfg, self.events, self.rate, self.probes = cfg, events, rate, probes
        self.sent_at: dict[str, float] = {}  # probe event id -> send time
        self.user_sends: dict[str, list[float]] = {}  # a user's probe send times, in order
        self.sent = 0
        self.started_at = self.last_probe_at = 0.0
        self.error: BaseException | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            with EventProducer(self.cfg.kafka, linger_ms=1) as producer:
                self.started_at = time.monotonic()
                for i, event in enumerate(self.events):
                    wait = self.started_at + i / self.rate - time.monotonic()
                    if self.stop_event.wait(max(wait, 0)):
                        break
                    producer.send_event(event.model_copy(update={"event_time": datetime.now(timezone.utc)}))
                    if i < self.probes:
                        self.last_probe_at = now = time.monotonic()
                        self.sent_at[event.event_id] = now
                        self.user_sends.setdefault(event.user_id, []).append(now)
                    self.sent = i + 1
        except Exception as exc:  # reported by the main thread's check
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise PlumError(f"the live replay failed: {self.error}")


def interleave_users(events: list[EngagementEvent]) -> list[EngagementEvent]:
    """The same events with each user's spread evenly over the sequence, each user's own order kept:
    many users active at once, as on a live service, instead of one user's rating sitting at a time."""
    totals = Counter(e.user_id for e in events)
    seen: Counter[str] = Counter()
    keyed = []
    for i, event in enumerate(events):
        keyed.append(((seen[event.user_id] + 0.5) / totals[event.user_id], i))
        seen[event.user_id] += 1
    return [events[i] for _, i in sorted(keyed)]
