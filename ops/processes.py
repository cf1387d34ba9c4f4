"""`plum` commands as processes of their own, as the main job and the benchmarks run the loop.

Each process runs against one state directory (the embedded broker's address passed on, and with
`config_file` exactly the configuration written there), writes its output to <state>/logs/<name>,
and is stopped with SIGTERM, SIGKILL after a grace period: the pipeline stops reading (committed
offsets stay committed), the trainer checkpoints, the server finishes in-flight requests.
`check()` turns an unexpected exit into ProcessExited, with the end of the process's log.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from ops.broker import stop_process
from ops.config import PlumConfig
from ops.errors import PlumError

SERVER_START_TIMEOUT_S = 300.0
_LISTENING = re.compile(r"gRPC on [^:]+:(\d+)[^;\n]*?(?:, REST on (http://[^\s;]+))?;")


class ProcessExited(PlumError):
    """A process of the loop exited while it was still needed; the message holds its log's end."""

    exit_code = 1


def write_config(cfg: PlumConfig, path: Path) -> Path:
    """The whole configuration as a YAML file a `plum --config` process reads back unchanged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


class PlumProcess:
    """A `plum` command as a separate process against a stack, its output in a log file.

    With `config_file` the process reads that file and no PLUM_* variable of this process's
    environment (the file already holds their effect), so it runs exactly that configuration;
    `env` still overrides single settings."""

    def __init__(self, cfg: PlumConfig, args: list[str], log_name: str, env: dict[str, str] | None = None,
                 stop_timeout: float = 20, config_file: Path | None = None) -> None:
        inherited = {k: v for k, v in os.environ.items() if config_file is None or not k.startswith("PLUM_")}
        env = {**inherited, "PLUM_KAFKA__BOOTSTRAP_SERVERS": cfg.kafka.bootstrap_servers, **(env or {})}
        prefix = ["--config", str(config_file)] if config_file is not None else []
        self.command = "plum " + " ".join(args)
        self.stop_timeout = stop_timeout
        self.log_file = cfg.paths.state("logs", log_name)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "--state-dir", cfg.paths.state_dir, *prefix, *args],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def check(self) -> None:
        """Raise ProcessExited if the process has exited."""
        if self.process.poll() is not None:
            tail = self.log().splitlines()[-20:]
            raise ProcessExited(f"`{self.command}` exited ({self.process.returncode}); the end of {self.log_file}:\n"
                                + "\n".join(tail))

    def stop(self) -> None:
        """SIGTERM (the process finishes what it must), SIGKILL after stop_timeout."""
        stop_process(self.process.pid, timeout=self.stop_timeout, process=self.process)


class StreamingPipeline(PlumProcess):
    """`plum pipeline`: the streaming ingestion pipeline."""

    def __init__(self, cfg: PlumConfig, config_file: Path | None = None, log_name: str = "pipeline.log") -> None:
        super().__init__(cfg, ["pipeline"], log_name, config_file=config_file)


def read_status(path: Path) -> dict[str, Any]:
    """The continuous trainer's status file ({} until it has written one)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


class TrainerProcess(PlumProcess):
    """`plum train --continuous`: stopped with SIGTERM, it checkpoints before it exits."""

    def __init__(self, cfg: PlumConfig, config_file: Path | None = None, env: dict[str, str] | None = None,
                 log_name: str = "trainer.log", stop_timeout: float = 60) -> None:
        super().__init__(cfg, ["train", "--continuous"], log_name, env=env, stop_timeout=stop_timeout,
                         config_file=config_file)
        from trainer.continuous import STATUS

        self.status_file = cfg.paths.trainer_dir / STATUS

    def status(self) -> dict[str, Any]:
        return read_status(self.status_file)


class ServerProcess(PlumProcess):
    """`plum serve` on free ports. Construction starts it; `wait_ready` waits until it listens and
    reads its ports from its log."""

    def __init__(self, cfg: PlumConfig, log_name: str = "serve.log", env: dict[str, str] | None = None,
                 config_file: Path | None = None) -> None:
        super().__init__(cfg, ["serve", "--grpc-port", "0", "--rest-port", "0"], log_name, env=env,
                         stop_timeout=30, config_file=config_file)
        self.started_at = time.monotonic()
        self.grpc_target: str | None = None
        self.rest_url: str | None = None  # None with REST off
        self.start_seconds: float | None = None

    def listening(self) -> bool:
        """Whether it listens yet (ports read from its log once it does)."""
        if self.grpc_target is None:
            match = _LISTENING.search(self.log())
            if match is None:
                return False
            self.grpc_target, self.rest_url = f"127.0.0.1:{match[1]}", match[2]
            self.start_seconds = round(time.monotonic() - self.started_at, 1)
        return True

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT_S) -> "ServerProcess":
        wait_for(self.listening, timeout, f"`{self.command}` to listen", [self])
        return self


def wait_for(condition: Callable[[], bool], timeout: float, what: str, processes: Sequence[PlumProcess] = (),
             progress: Callable[[], str] | None = None, say: Callable[[str], None] = print,
             every: float = 30.0, poll: float = 0.5) -> float:
    """Wait until `condition()` holds, checking that `processes` still run; every `every` seconds say
    `progress()` (what is awaited and how far it got). Returns the seconds waited; PlumError on timeout."""
    started = time.monotonic()
    next_say = started + every
    while not condition():
        for process in processes:
            process.check()
        now = time.monotonic()
        if now - started > timeout:
            raise PlumError(f"timed out after {timeout:.0f} s waiting for {what}"
                            + (f" ({progress()})" if progress else ""))
        if progress is not None and now >= next_say:
            say(f"  ... waiting for {what} ({now - started:.0f} s): {progress()}")
            next_say += every
        time.sleep(poll)
    return time.monotonic() - started
