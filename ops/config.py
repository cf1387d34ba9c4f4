"""The one configuration of PLUM-stream: built-in embedded defaults < YAML file < environment.

Environment overrides use the prefix PLUM_ and a double underscore between levels, for example
PLUM_KAFKA__BOOTSTRAP_SERVERS=broker-1:9092 or PLUM_FEAST__ONLINE_STORE__TYPE=redis. Values are
parsed as YAML scalars, so numbers and booleans work. PLUM_CONFIG names the YAML file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from typing_extensions import get_type_hints, is_typeddict

from features.config import FeastConfig
from ingest.config import KafkaConfig, PipelineConfig
from tokenizer.config import TokenizeSettings
from trainer.config import TrainerSettings
from serving.config import ServingSettings
from ops.errors import ConfigError

ENV_PREFIX = "PLUM_"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _default_data_dir() -> str:
    return str((PROJECT_ROOT.parent / "shared" / "data").resolve())


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "plum-stream")


class PathsConfig(BaseModel):
    """Where state, cached assets and data sets live."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: str = ".plum"
    cache_dir: str = Field(default_factory=_default_cache_dir)
    data_dir: str = Field(default_factory=_default_data_dir)
    model_base: str = ""  # servable versions: <model_base>/<model_name>/<version>; default <state>/models
    model_name: str = "plum"

    def state(self, *parts: str) -> Path:
        return Path(self.state_dir).resolve().joinpath(*parts)

    @property
    def training_log_dir(self) -> Path:
        return self.state("training_log")

    @property
    def pipeline_state_db(self) -> Path:
        return self.state("pipeline", "state.db")

    @property
    def sid_dir(self) -> Path:
        return self.state("sid")

    @property
    def checkpoint_dir(self) -> Path:
        return self.state("checkpoints")

    @property
    def model_dir(self) -> Path:
        """Where the trainer exports servable versions and the server looks for them."""
        base = Path(self.model_base).resolve() if self.model_base else self.state("models")
        return base / self.model_name

    @property
    def trainer_dir(self) -> Path:
        """The continuous trainer's checkpoints and status file."""
        return self.state("trainer")

    @property
    def stack_file(self) -> Path:
        return self.state("stack.json")


class PromoteSettings(BaseModel):
    """The `promote:` section: the gates of `plum promote`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    margin: float = Field(0.01, ge=0.0)  # how far Recall@10 / NDCG@10 may trail the labelled version
    confidence: float = Field(0.95, ge=0.5, lt=1.0)  # ...established at this one-sided confidence to refuse
    min_eval_examples: int = Field(20, ge=1)  # users needed for a fresh side-by-side evaluation
    eval_examples: int = Field(200, ge=1)  # at most this many users (the newest) are evaluated
    beam_width: int = Field(10, ge=1)
    max_staleness_hours: float = Field(24.0, gt=0)
    # The popularity floor gate (always on in production; off only for runs too small to learn anything,
    # `plum demo --no-popularity-floor`): the audit entry then records it as not applied.
    popularity_floor: bool = True


class PlumConfig(BaseModel):
    """Everything configurable, one section per component."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    paths: PathsConfig = Field(default_factory=PathsConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    feast: FeastConfig = Field(default_factory=FeastConfig)
    tokenizer: TokenizeSettings = Field(default_factory=TokenizeSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    promote: PromoteSettings = Field(default_factory=PromoteSettings)

    @property
    def feast_repo_dir(self) -> Path:
        return Path(self.feast.repo_dir).resolve() if self.feast.repo_dir else self.paths.state("feast")


def _set_path(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Environment override for {'.'.join(keys)} conflicts with a scalar value.")
        node = child
    node[keys[-1]] = value


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == "PLUM_CONFIG" or "__" not in name:
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # Addresses such as host:9092 must stay strings.
        if isinstance(value, (dict, list)) or value is None:
            value = raw
        _set_path(tree, keys, value)
    return tree


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> PlumConfig:
    """Build the configuration from defaults, a YAML file (or $PLUM_CONFIG), the environment and overrides."""
    env = os.environ if env is None else env
    path = path or env.get("PLUM_CONFIG")
    sources: list[tuple[str, Mapping[str, Any]]] = []
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"Config file {file} does not exist; pass an existing YAML file.")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {file} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {file} must hold a mapping of sections (kafka:, paths:, ...).")
        sources.append((f"config file {file}", loaded))
    sources += [("the environment", _env_overrides(env)), ("the command-line options", overrides or {})]
    tree: dict[str, Any] = {}
    for _, layer in sources:
        tree = _merge(tree, layer)
    try:
        return PlumConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(_problem(err, sources) for err in exc.errors())
        raise ConfigError(f"Invalid configuration: {problems}.") from None


def _problem(err: Any, sources: list[tuple[str, Mapping[str, Any]]]) -> str:
    """One validation error as `section.key: what is wrong`; an unknown key (extra="forbid", in any
    section) also says which layer set it and which keys its section takes."""
    loc = [str(part) for part in err["loc"]]
    where = ".".join(loc)
    if err["type"] != "extra_forbidden":
        return f"{where}: {err['msg']}"
    origin = next((name for name, layer in reversed(sources) if _holds(layer, loc)), "the configuration")
    if origin == "the environment":
        origin = f"the environment variable {ENV_PREFIX}{'__'.join(loc).upper()}"
    known = _section_keys(loc[:-1])
    takes = f"; {'.'.join(loc[:-1]) or 'the config'} takes {', '.join(known)}" if known else ""
    return f"{where}: unknown key (set in {origin}){takes}"


def _holds(tree: Any, loc: list[str]) -> bool:
    for key in loc:
        if not isinstance(tree, Mapping) or key not in tree:
            return False
        tree = tree[key]
    return True


def _section_keys(loc: list[str]) -> list[str]:
    """The keys of the config section at loc (a pydantic model or a TypedDict); [] if loc is no section."""
    section: Any = PlumConfig
    for key in [*loc, None]:
        if isinstance(section, type) and issubclass(section, BaseModel):
            fields = {name: info.annotation for name, info in section.model_fields.items()}
        elif is_typeddict(section):
            fields = get_type_hints(section)
        else:
            break
        if key is None:
            return list(fields)
        section = fields.get(key)
    return []
