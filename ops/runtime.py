"""Where the running parts of a state directory can be reached: `<state>/run/<part>.json`.

The long-running commands (`plum pipeline`, `plum train --continuous`, `plum serve`) record their
pid and endpoints once they are up and remove the record when they stop; `plum status` reads them
instead of guessing ports (a server started with `--rest-port 0` has a port nobody configured). A
record whose process is gone (killed with SIGKILL) counts as not running.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from ops.broker import pid_alive
from ops.config import PlumConfig


@dataclass(frozen=True)
class RunningPart:
    """What a running part recorded about itself."""

    part: str
    pid: int
    started_at: str
    endpoints: dict[str, str] = field(default_factory=dict)  # name -> URL or host:port


def _record_path(cfg: PlumConfig, part: str) -> Path:
    return cfg.paths.state("run", f"{part}.json")


@contextmanager
def announce(cfg: PlumConfig, part: str, **endpoints: str) -> Iterator[RunningPart]:
    """Record this process as the running `part` for as long as the block runs."""
    record = RunningPart(part, os.getpid(), datetime.now(timezone.utc).isoformat(timespec="seconds"), endpoints)
    path = _record_path(cfg, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(record), indent=2))
    os.replace(tmp, path)
    try:
        yield record
    finally:
        current = find(cfg, part)
        if current is not None and current.pid == record.pid:  # a later process may have taken over
            path.unlink(missing_ok=True)


def find(cfg: PlumConfig, part: str) -> RunningPart | None:
    """The running `part` of this state directory, or None when none is recorded or its process is gone."""
    path = _record_path(cfg, part)
    try:
        record = RunningPart(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return record if pid_alive(record.pid) else None
