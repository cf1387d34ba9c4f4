"""Which versions are served, and their life cycle (TF Serving's vocabulary: source -> loader -> manager).

The source is the model base path: numeric directories that hold a manifest (trainer/servable.py
renames complete versions into place, so nothing else is a candidate). The version policy is a
pure function of (versions on disk, labels): latest N, specific versions, or all. Labels
(stable, canary) come from `labels.json` beside the versions, or from the server config.

Life cycle per version: START -> LOADING (load, then warm up: compile for every batch shape) ->
AVAILABLE (takes traffic) -> UNLOADING (no new requests; in-flight requests finish) -> END. A
version that fails to load goes to END with its error kept for GetModelStatus, and the versions
already served stay; it is retried only when its directory changes.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from trainer.checkpoint import CheckpointError
from trainer.servable import labels as read_labels
from trainer.servable import version_numbers

from serving.engine import DotProductVersion, IncompatibleVersion, ServableVersion, load_servable

State = Literal["START", "LOADING", "AVAILABLE", "UNLOADING", "END"]
Say = Callable[[str], None]


@dataclass(frozen=True)
class VersionPolicy:
    """TF Serving's model_version_policy: `latest` (the newest `num_versions`), `specific`, or `all`."""

    kind: Literal["latest", "specific", "all"] = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int], labelled: dict[str, int]) -> set[int]:
        """The versions to serve: the policy's, plus every labelled version that exists."""
        if self.kind == "latest":
            chosen = set(sorted(available)[-self.num_versions:]) if self.num_versions > 0 else set()
        elif self.kind == "specific":
            chosen = set(self.versions) & set(available)
        else:
            chosen = set(available)
        return chosen | {v for v in labelled.values() if v in available}


@dataclass
class VersionStatus:
    version: int
    state: State = "START"
    error: str = ""
    loaded: ServableVersion | DotProductVersion | None = None
    in_flight: int = 0
    signature: tuple[float, ...] = ()  # the directory's manifest mtime when last tried


@dataclass
class ServingConfig:
    """What one model serves; changed at run time by HandleReloadConfigRequest."""

    name: str
    base_path: Path
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    labels: dict[str, int] | None = None  # None: read labels.json from the base path
    canary_share: float = 0.0  # share of unlabelled-version requests answered by the canary


class UnknownVersion(Exception):
    """A request names a version or label that is not available."""


class VersionManager:
    """Keeps the policy's versions loaded and routes each request to an available one."""

    def __init__(self, config: ServingConfig, beam_width: int, max_batch: int, say: Say = print,
                 poll_interval_s: float = 1.0) -> None:
        self.config, self.beam_width, self.max_batch, self.say = config, beam_width, max_batch, say
        self.poll_interval_s = poll_interval_s
        self.statuses: dict[int, VersionStatus] = {}
        self.lock = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._random = random.Random(0)
        self._labels = self._read_labels()  # re-read at every poll, not per request

    # Source and loader ------------------------------------------------------------------------
    def labels(self) -> dict[str, int]:
        """The labels as of the last poll (labels.json is re-read every poll_interval_s)."""
        with self.lock:
            return dict(self._labels)

    def _read_labels(self) -> dict[str, int]:
        if self.config.labels is not None:
            return dict(self.config.labels)
        try:
            return read_labels(self.config.base_path)
        except CheckpointError as exc:
            self.say(f"serve: ignoring labels: {exc}")
            return {}

    def poll_once(self) -> None:
        """One pass of the source: load what the policy wants, unload what it no longer wants."""
        available = version_numbers(self.config.base_path)
        labelled = self._read_labels()
        with self.lock:
            self._labels = labelled
        wanted = self.config.policy.select(available, labelled)
        for number in sorted(wanted):
            signature = _signature(self.config.base_path / str(number))
            with self.lock:
                status = self.statuses.get(number)
                if status is not None and (status.state in ("LOADING", "AVAILABLE")
                                           or (status.state == "END" and status.signature == signature)):
                    continue
                status = self.statuses[number] = VersionStatus(number, "LOADING", signature=signature)
            self._load(status)
        for number, status in list(self.statuses.items()):
            if status.state == "AVAILABLE" and number not in wanted and self._others_available(number):
                self._unload(status)

    def _others_available(self, number: int) -> bool:
        return any(s.state == "AVAILABLE" for v, s in self.statuses.items() if v != number)

    def _load(self, status: VersionStatus) -> None:
        started = time.monotonic()
        try:
            loaded = load_servable(self.config.base_path, status.version, self.beam_width)
            loaded.warm_up(self.max_batch)
        except (CheckpointError, IncompatibleVersion, OSError, ValueError, KeyError) as exc:
            with self.lock:
                status.state, status.error = "END", f"version {status.version} could not be loaded: {exc}"
            self.say(f"serve: {status.error}")
            return
        with self.lock:
            status.loaded, status.state = loaded, "AVAILABLE"
            self.lock.notify_all()
        self.say(f"serve: version {status.version} AVAILABLE (loaded and warmed up in "
                 f"{time.monotonic() - started:.1f} s, {len(loaded.items.item_ids):,} items)")
        if isinstance(loaded, ServableVersion) and loaded.recorded_beam_width is None:
            self.say(f"serve: version {status.version}'s manifest records no beam width (exported before it "
                     f"did); it searches with serving.beam_width {loaded.beam_width}")
        elif isinstance(loaded, ServableVersion) and loaded.recorded_beam_width != loaded.beam_width:
            self.say(f"serve: version {status.version} searches with beam width {loaded.beam_width}, not the "
                     f"{loaded.recorded_beam_width} its manifest records and its gates judged "
                     f"(serving.beam_width caps it)")

    def _unload(self, status: VersionStatus) -> None:
        with self.lock:
            status.state = "UNLOADING"
            self.lock.wait_for(lambda: status.in_flight == 0, timeout=60)
            status.loaded, status.state = None, "END"
        self.say(f"serve: version {status.version} unloaded")

    def start(self) -> None:
        self.poll_once()
        self._thread = threading.Thread(target=self._watch, name="version-watcher", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll_once()
            except Exception as exc:  # the watcher must outlive one bad pass; the error is visible
                self.say(f"serve: version watcher error: {exc!r}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # Manager: routing ---------------------------------------------------------------------------
    def available(self) -> list[int]:
        with self.lock:
            return sorted(v for v, s in self.statuses.items() if s.state == "AVAILABLE")

    def choose(self, version: int | None = None, label: str | None = None) -> int:
        """The version a request is answered by: the one named, the label's, or the policy's default
        (stable, with `canary_share` of requests to canary; without labels the newest available)."""
        available = self.available()
        if version is not None:
            if version not in available:
                raise UnknownVersion(f"version {version} of model {self.config.name!r} is not available "
                                     f"(available: {available or 'none'})")
            return version
        labelled = self.labels()
        if label is not None:
            if labelled.get(label) not in available:
                raise UnknownVersion(f"label {label!r} of model {self.config.name!r} does not point at an "
                                     f"available version (labels: {labelled or 'none'})")
            return labelled[label]
        if not available:
            raise UnknownVersion(f"model {self.config.name!r} has no available version yet")
        canary = labelled.get("canary")
        if canary in available and self._random.random() < self.config.canary_share:
            return canary
        stable = labelled.get("stable")
        return stable if stable in available else available[-1]

    def acquire(self, number: int) -> ServableVersion | DotProductVersion:
        """Pin an available version for one batch (release it after); raises if it is not available."""
        with self.lock:
            status = self.statuses.get(number)
            if status is None or status.state != "AVAILABLE" or status.loaded is None:
                raise UnknownVersion(f"version {number} of model {self.config.name!r} is not available")
            status.in_flight += 1
            return status.loaded

    def release(self, number: int) -> None:
        with self.lock:
            self.statuses[number].in_flight -= 1
            self.lock.notify_all()

    def snapshot(self) -> list[VersionStatus]:
        with self.lock:
            return [VersionStatus(s.version, s.state, s.error) for _, s in sorted(self.statuses.items())]

    def reconfigure(self, config: ServingConfig) -> None:
        """Adopt a new config (policy, labels); the next poll loads and unloads accordingly."""
        with self.lock:
            self.config = config
        self.poll_once()


def _signature(directory: Path) -> tuple[float, ...]:
    try:
        return ((directory / "manifest.json").stat().st_mtime,)
    except OSError:
        return ()
