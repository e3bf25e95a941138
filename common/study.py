"""The study's configuration: what the coordinator publishes and what each site keeps.

Two halves, on purpose:

- ``StudyConfig`` is the coordinator's run config (Flower's ``[tool.flwr.app.config]``,
  or the options of ``fedsynth simulate``). It is sent to every site with each round, so
  all sites train the same model with the same plan.
- ``SiteConfig`` is a site's own node config: its data file, its schema copy, its
  privacy budget. The coordinator never sets these; a site's budget is its decision.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .schema import Schema

STRATEGIES = ("fedavg", "fedprox")


class ConfigError(ValueError):
    """A run or node config value is wrong; the message names the key."""


@dataclass(frozen=True)
class StudyConfig:
    """Run config of a study (kebab-case keys in Flower's run config)."""

    study_id: str = "fedsynth-study"
    schema: str = "heart_disease"
    min_sites: int = 2
    num_server_rounds: int = 10
    local_epochs: int = 2
    sample_rate: float = 0.1
    generator: str = "tvae"
    generator_params: dict[str, Any] = field(default_factory=dict)
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    count_noise: float = 10.0
    loss_report: bool = True
    seed: int = 42
    output_dir: str = "fedsynth-output"
    n_synthetic: int = 0
    resume: bool = False
    simulation_sites: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.num_server_rounds < 1:
            problems.append("num-server-rounds must be >= 1")
        if self.min_sites < 1:
            problems.append("min-sites must be >= 1")
        if self.local_epochs < 1:
            problems.append("local-epochs must be >= 1")
        if not 0 < self.sample_rate <= 1:
            problems.append("sample-rate must be in (0, 1]")
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy must be one of {', '.join(STRATEGIES)}")
        if self.proximal_mu < 0:
            problems.append("proximal-mu must be >= 0")
        if self.max_grad_norm <= 0:
            problems.append("max-grad-norm must be > 0")
        if self.count_noise <= 0:
            problems.append("count-noise must be > 0 (the row count is released with DP)")
        if problems:
            raise ConfigError("invalid study config: " + "; ".join(problems))

    def to_flat(self) -> dict[str, Any]:
        """Kebab-case scalars for a Flower ConfigRecord / run config."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "generator_params":
                value = json.dumps(value, sort_keys=True)
            out[key.replace("_", "-")] = value
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> StudyConfig:
        """Parse a run config or a received ConfigRecord, ignoring unrelated keys."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in flat:
                continue
            value = flat[key]
            if f.name == "generator_params":
                try:
                    value = json.loads(value) if isinstance(value, str) else dict(value)
                except (json.JSONDecodeError, TypeError) as exc:
                    raise ConfigError(f"generator-params must be a JSON object: {exc}") from None
            kwargs[f.name] = _coerce(key, value, f.type)
        return cls(**kwargs)


@dataclass(frozen=True)
class SiteConfig:
    """A site's node config: its table, its schema and its own privacy budget."""

    name: str
    data_path: str
    schema_path: str
    epsilon: float = 3.0
    delta: float = 1e-5
    dp: bool = True
    state_dir: str = ""
    # A site may fix its own noise multiplier (institutional policy) instead of having
    # it calibrated to the study's plan; its budget then caps how many rounds it joins.
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"site {self.name}: noise-multiplier must be > 0")
        if self.dp and not (self.epsilon > 0):
            raise ConfigError(f"site {self.name}: epsilon must be > 0 (or set dp = false)")
        if self.dp and not (0 < self.delta < 1):
            raise ConfigError(f"site {self.name}: delta must be in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_node_config(cls, node: dict[str, Any]) -> SiteConfig:
        required = ("data-path", "schema-path")
        missing = [k for k in required if k not in node]
        if missing:
            raise ConfigError(
                f"node config lacks {', '.join(missing)}; start the SuperNode with "
                "--node-config \"data-path='...' schema-path='...' epsilon=3.0\""
            )
        return cls(
            name=str(node.get("site-name", Path(str(node["data-path"])).stem)),
            data_path=str(node["data-path"]),
            schema_path=str(node["schema-path"]),
            epsilon=_coerce("epsilon", node.get("epsilon", 3.0), float),
            delta=_coerce("delta", node.get("delta", 1e-5), float),
            dp=_coerce("dp", node.get("dp", True), bool),
            state_dir=str(node.get("state-dir", "")),
            noise_multiplier=(
                _coerce("noise-multiplier", node["noise-multiplier"], float)
                if "noise-multiplier" in node
                else None
            ),
        )


def schema_fingerprint(schema: Schema) -> str:
    """A short hash of the schema, so sites refuse to train on a different one."""
    return hashlib.sha256(schema.to_json().encode()).hexdigest()[:16]


def _coerce(key: str, value: Any, typ: Any) -> Any:
    name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if name in ("int", int):
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if name in ("float", float):
            return float(value)
        if name in ("bool", bool):
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            return bool(value)
        if name in ("str", str):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r}: {value!r} is not a valid {name}") from None
    return value
