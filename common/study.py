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
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FedsynthError
from .quantile_grid import DEFAULT_GRID_SHARE
from .schema import Schema

if TYPE_CHECKING:
    from .privacy.randomness import DPRandomness

STRATEGIES = ("fedavg", "fedprox")
#: The accountants a site composes its releases with: Opacus' RDP and PRV, both upper
#: bounds. (Opacus' ``gdp`` is a central-limit approximation, not a bound: a study may
#: not name it.)
ACCOUNTANTS = ("rdp", "prv")
SECURE_AGGREGATION = ("none", "ckks", "masks")
# Flower strategies whose aggregate is not a weighted sum of the updates, with what the
# coordinator would need in clear to compute it. Under CKKS it holds ciphertexts it can
# only add, so these cannot run; naming them gets a reason instead of a bare "unknown".
NONLINEAR_STRATEGIES: dict[str, str] = {
    "fedadam": "a server optimizer with per-coordinate second moments of the update",
    "fedyogi": "a server optimizer with per-coordinate second moments of the update",
    "fedadagrad": "a server optimizer with per-coordinate squared updates",
    "fedavgm": "server momentum and learning rate applied to the global model in clear",
    "fedmedian": "a coordinate-wise median of the updates",
    "fedtrimmedavg": "a coordinate-wise sort of the updates to trim the extremes",
    "krum": "pairwise distances between the sites' updates",
    "multikrum": "pairwise distances between the sites' updates",
    "bulyan": "pairwise distances and coordinate-wise sorting of the updates",
}


#: The clipping bounds a study may name (``max-grad-norm``). DP-SGD's analysis holds
#: for any bound C in exact arithmetic, but a site clips in float32: at C = 1e-44
#: (seven of float32's smallest subnormals) a clip factor ``C / norm`` and the clipped
#: gradient round to multiples of 1.4e-45, and one heart-disease row's clipped gradient
#: had norm 2.09 C while the ledger charged C (epsilon 4.1 spent for 1.8 charged in one
#: round; tests/test_coordinator_attacks_3.py). Clipping in float64 (privacy/bookkeeping.py)
#: leaves one rounding, of the clipped sum to float32, which still made it 1.13 C there.
#: Within this range that rounding is float32's relative 6e-8 (its subnormal steps are
#: 1e-39 of C), so the clipped norm is C on cleveland's rows to 1e-5. An honest study
#: uses 0.1-10; the coordinator picks the value.
MAX_GRAD_NORM_RANGE = (1e-6, 1e6)

#: The most DP-SGD steps one round may ask of a site (``local-epochs x int(1 /
#: sample-rate)``). Not a privacy bound (the ledger prices any number of steps) but a
#: site answers one request at a time: a coordinator that sent sample-rate 1e-12 passed
#: every other check and kept the site training, its lock held, for ever (third audit).
#: The default study takes 20 steps; 0.01 x 200 epochs would be 20,000.
MAX_STEPS_PER_ROUND = 100_000

#: A site's default privacy budget (per table, for life) and delta: the one place they
#: are written; every command, config and API reads them from here.
DEFAULT_EPSILON = 3.0
DEFAULT_DELTA = 1e-5


def steps_per_round(sample_rate: float, epochs: int = 1) -> int:
    """Poisson steps in ``epochs`` local epochs: ``int(1 / q)`` each, as Opacus' sampler
    makes them (``UniformWithReplacementSampler.__len__``); the accountant, the
    coordinator's update bounds and ``MAX_STEPS_PER_ROUND`` use this same figure. Here,
    not in privacy/, so that validating a config imports neither torch nor Opacus."""
    return epochs * int(1.0 / sample_rate)


class ConfigError(FedsynthError, ValueError):
    """A run or node config value is wrong; the message names the key."""


#: Seeds every command accepts (``fedsynth --seed``, a study's ``seed``): numpy refuses
#: negative seeds and its legacy seeding (mbi's sampler) and scikit-learn's
#: ``random_state`` take at most 2**32 - 1; half of that leaves room for the offsets the
#: code adds to a seed (per site, per sample, per benchmark seed).
SEED_RANGE = (0, 2**31 - 1)


def check_budget(epsilon: float, delta: float, who: str = "a site") -> None:
    """The one check of a DP budget's numbers, wherever a budget enters (a site's node
    config, ``fedsynth simulate``'s flags, the study API).

    Why finite: an infinite epsilon is no privacy at all, and NaN compared false in every
    later check, so it reached the planners and failed there with a traceback. A study
    without DP says so (``dp = false``, ``--no-dp``) rather than by an infinite budget.
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"{who}: the budget's epsilon must be a finite number > 0, got "
                          f"{epsilon!r} (without DP: dp = false in a config, --no-dp on "
                          "the command line, epsilon=None in Python)")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ConfigError(f"{who}: the budget's delta must be in (0, 1), got {delta!r} "
                          "(1e-5 is usual: well below one over the number of patients)")


@dataclass(frozen=True)
class StudyConfig:
    """Run config of a study (kebab-case keys in Flower's run config)."""

    study_id: str = "fedsynth-study"
    schema: str = "heart_disease"
    min_sites: int = 2
    num_server_rounds: int = 10
    local_epochs: int = 20
    sample_rate: float = 1.0
    generator: str = "tvae"
    generator_params: dict[str, Any] = field(default_factory=dict)
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    count_noise: float = 10.0
    # Share of each site's budget for the quantile-grid release a deep generator's
    # study makes before training (common/quantile_grid.py); 0: no release, the
    # public-bounds encoding.
    grid_share: float = DEFAULT_GRID_SHARE
    loss_report: bool = True
    seed: int = 42
    output_dir: str = "fedsynth-output"
    n_synthetic: int = 0
    resume: bool = False
    simulation_sites: str = ""
    # "ckks": sites send CKKS-encrypted weighted updates, the coordinator only adds them
    # with the public context at ``public_context`` (a path on the coordinator's side).
    # "masks" (marginal studies): sites send pairwise-masked vectors whose masks cancel
    # only in the sum of every site's (common/encryption/masks.py); what lets a site
    # split its noise with others (SiteConfig.honest_sites).
    secure_aggregation: str = "none"
    # Distributed noise (masks only): the split H every site applies. The coordinator
    # then sends one common noise level per release kind (the most private site's);
    # each site adds 1/H of its variance, and answers only if H is within its own
    # honest-sites and the common level is at least what its budget needs.
    honest_sites: int = 1
    public_context: str = ""
    # Public upper bound B on a site's FedAvg weight (its DP row count): sites encrypt
    # n_i / B so that no count travels in clear (see common/encryption/ckks.py).
    count_bound: float = 100_000.0
    # Seconds the coordinator waits for a round's replies. A site that crashed or hangs
    # must not stall the study: when the time is up the round goes on with the replies
    # that arrived (if at least min-sites), and the silent sites are logged by name.
    round_timeout: float = 3600.0
    # A file (on the coordinator) where every message that crosses the network is
    # described: record types, keys, array shapes, value lengths, never the values.
    # Empty: off. It is the evidence that no row-level data leaves a site.
    record_messages: str = ""
    # After the study, ask every site to score the released synthetic table against its
    # own rows and send back scores only (common/validation/federated.py): validation
    # of a deployment without pooling real data. Off by default: a simulation already
    # validates against its real holdout, and this costs one more message per site.
    federated_validation: bool = False
    # The coordinator's step on the sites' averaged update (FedAvgM, Hsu et al. 2019):
    # new = old + server_lr * v, v = server_momentum * v + (average - old). It is
    # post-processing of DP releases (no privacy cost) and averages each round's
    # independent DP noise over rounds: on the heart-disease study at epsilon 3 the
    # median TSTR AUROC over 5 seeds went from 0.68 to 0.76 with momentum 0.5
    # (docs/generators.md). Under CKKS the coordinator never sees the average, so no
    # server step is taken there and these two keys are ignored.
    server_lr: float = 1.0
    server_momentum: float = 0.5

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
        elif (self.local_epochs >= 1
              and steps_per_round(self.sample_rate, self.local_epochs) > MAX_STEPS_PER_ROUND):
            problems.append(f"local-epochs / sample-rate must be at most "
                            f"{MAX_STEPS_PER_ROUND:,} DP-SGD steps per round (raise "
                            "sample-rate or lower local-epochs)")
        if self.secure_aggregation not in SECURE_AGGREGATION:
            problems.append(f"secure-aggregation must be one of {', '.join(SECURE_AGGREGATION)}")
        elif (self.secure_aggregation == "masks" and self.generator != "marginal"
              and self.grid_share <= 0):
            problems.append("secure-aggregation = 'masks' sums count releases: a marginal "
                            "study's, or a deep generator's quantile grid (grid-share > 0). "
                            "With grid-share = 0 nothing would be masked: set grid-share, "
                            "or sum the models under 'ckks'")
        if not _is_count(self.honest_sites):
            problems.append("honest-sites must be a whole number >= 1")
        elif self.honest_sites > 1 and self.secure_aggregation != "masks":
            problems.append("honest-sites > 1 splits the sites' noise, which is private only "
                            "inside a masked sum: use secure-aggregation = 'masks'")
        strategy_problem = check_strategy(self.strategy, self.secure_aggregation)
        if strategy_problem:
            problems.append(strategy_problem)
        if not self.study_id.strip():
            # a site keeps each study's once-only answers under its id; an empty one was
            # filed under no name and came back reset (the twelfth session's audit)
            problems.append("study-id must not be empty: name the study")
        if not (math.isfinite(self.count_bound) and self.count_bound > 0):
            problems.append("count-bound must be a positive number (an upper bound on rows)")
        if not (math.isfinite(self.round_timeout) and self.round_timeout > 0):
            problems.append("round-timeout must be a positive number of seconds")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            problems.append("server-lr must be a positive number")
        if not 0 <= self.server_momentum < 1:
            problems.append("server-momentum must be in [0, 1)")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            problems.append("proximal-mu must be a number >= 0")
        low, high = MAX_GRAD_NORM_RANGE
        if not low <= self.max_grad_norm <= high:  # NaN fails too
            problems.append(f"max-grad-norm must be in [{low:g}, {high:g}] (the clipping "
                            "bound; below it float32 rounding breaks the clip)")
        if not 0 <= self.grid_share < 1:
            problems.append("grid-share must be in [0, 1) (0: no quantile-grid release)")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {', '.join(ACCOUNTANTS)}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            problems.append(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
        if self.n_synthetic < 0:
            problems.append("n-synthetic must be >= 0 (0: about the number of training rows)")
        # NaN or inf made the site draw the count release and fail on it, and a sigma
        # past 1e154 or below 1e-154 makes Opacus' RDP terms overflow or divide by zero
        if not 1e-6 <= self.count_noise <= 1e6:
            problems.append("count-noise must be in [1e-6, 1e6] (the std of the DP row "
                            "count release)")
        if problems:
            raise ConfigError("invalid study config: " + "; ".join(problems))

    @property
    def releases_grid(self) -> bool:
        """Whether the sites release a quantile-grid histogram before training: a deep
        generator's study with ``grid-share`` > 0, in clear, under CKKS (a sum one site
        decrypts) or under masks (the marginal one measures its own; docs/privacy.md)."""
        return self.grid_share > 0 and self.generator != "marginal"

    @property
    def encrypted(self) -> bool:
        """Whether the study aggregates under CKKS (sites send ciphertexts only)."""
        return self.secure_aggregation == "ckks"

    @property
    def masked(self) -> bool:
        """Whether the sites' count vectors are pairwise-masked: a marginal study's sums,
        or a deep study's quantile grid (its model updates then travel in clear)."""
        return self.secure_aggregation == "masks"

    @property
    def trains(self) -> bool:
        """Whether the sites train a deep generator (model updates), not measure counts."""
        return self.generator != "marginal"

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


VALIDATION_SCORES = ("none", "quality", "all")
#: A site's own DP-SGD noise multiplier: inf passed the old "> 0" check, Opacus' RDP
#: accountant overflows past about 1e154, and below 1e-6 the noise protects nothing
#: (epsilon in the trillions); the same range as count-noise's (StudyConfig).
NOISE_MULTIPLIER_RANGE = (1e-6, 1e6)


@dataclass(frozen=True)
class SiteConfig:
    """A site's node config: its table, its schema and its own privacy budget."""

    name: str
    data_path: str
    schema_path: str
    epsilon: float = DEFAULT_EPSILON
    delta: float = DEFAULT_DELTA
    dp: bool = True
    state_dir: str = ""
    # A site may fix its own noise multiplier (institutional policy) instead of having
    # it calibrated to the study's plan; its budget then caps how many rounds it joins.
    noise_multiplier: float | None = None
    # Encrypted studies: this site's X25519 key folder (``fedsynth keys site-init``), the
    # key holder's public key and this site's wrapped CKKS context (both from the key
    # holder). Together they open the study's secret context, in memory only.
    key_dir: str = ""
    holder_public_key: str = ""
    wrapped_context: str = ""
    # Masked sums (secure-aggregation = "masks"): a folder of the other sites' X25519
    # public keys, one <site>.pem each, checked by fingerprint with each site. A site
    # with peer-keys answers no study in clear; in a masked deep study its model updates
    # (DP releases at its whole budget) are the one thing it sends unmasked.
    peer_keys: str = ""
    # The sites of the roster, this one included, that this site trusts not to collude
    # with the coordinator: the largest split of its noise it accepts. In a masked study
    # that asks a split H <= this, it adds 1/H of the study's common noise variance: the
    # sum of H honest sites carries the whole, and the ledger charges the whole. Against
    # a coordinator joined by all the other sites it has spent ``epsilon-alone``
    # (reported beside epsilon). 1: no split, the guarantee holds whoever colludes.
    # docs/privacy.md, "Distributed noise".
    honest_sites: int = 1
    # Federated validation scores are statistics of this site's rows released outside
    # DP, so the site decides, not the coordinator: "none" (default) declines, "quality"
    # sends the fidelity and utility scores, "all" adds the per-patient screens
    # (dcr_min, exact_copies, synthetic_recall, nearest_synthetic_distance_mean), in an
    # encrypted study only: in clear "all" sends what "quality" does. docs/validation.md.
    validation_scores: str = "none"
    # Tests and benchmarks only: a site-local seed that makes this site's DP draws
    # (noise, Poisson batches) reproducible. Its outputs are not a DP release (anyone
    # who learns the seed replays the noise), are labelled so, and a real SuperNode
    # refuses to start with it (client/app.py, fedsynth preflight). None: secret noise
    # from the OS CSPRNG, the only setting that gives the guarantee.
    reproducible_noise_seed: int | None = None

    def __post_init__(self) -> None:
        if self.validation_scores not in VALIDATION_SCORES:
            raise ConfigError(
                f"site {self.name}: validation-scores must be one of "
                f"{', '.join(VALIDATION_SCORES)}, got {self.validation_scores!r}"
            )
        low, high = NOISE_MULTIPLIER_RANGE
        if self.noise_multiplier is not None and not low <= self.noise_multiplier <= high:
            raise ConfigError(f"site {self.name}: noise-multiplier must be in "
                              f"[{low:g}, {high:g}], got {self.noise_multiplier:g}")
        if self.dp:
            check_budget(self.epsilon, self.delta, f"site {self.name}")
        if not _is_count(self.honest_sites):
            raise ConfigError(f"site {self.name}: honest-sites must be a whole number >= 1, "
                              f"got {self.honest_sites!r}")
        if self.honest_sites > 1 and not (self.peer_keys and self.key_dir):
            raise ConfigError(
                f"site {self.name}: honest-sites = {self.honest_sites} splits this site's "
                "noise with others, which is private only inside a masked sum: give "
                "key-dir and peer-keys (secure-aggregation = 'masks'), or keep "
                "honest-sites = 1")

    @property
    def requires_encryption(self) -> bool:
        """A site set up with its CKKS key files, or with a roster for masked sums,
        refuses every study in clear (a masked deep study's updates, DP releases at the
        site's whole budget, travel unmasked: ``accepts``).

        Encryption is the site's decision, not the coordinator's: a coordinator that
        sends ``secure-aggregation = "none"`` to such a site gets a refusal, not weights.
        """
        return bool(self.key_dir or self.wrapped_context or self.peer_keys)

    def accepts(self, study: StudyConfig) -> bool:
        """Whether this site may answer ``study`` as its aggregation is set: anything
        without keys; CKKS with CKKS keys; masks with a roster; a noise split of at most
        its ``honest_sites``."""
        if study.honest_sites > self.honest_sites:
            return False
        if not self.requires_encryption:
            return True
        if study.masked:  # a CKKS context asks for hidden updates: a masked deep study
            return bool(self.peer_keys) and not (study.trains and self.wrapped_context)
        return study.encrypted

    def aggregation_problem(self, study: StudyConfig) -> str:
        """Why this site answers nothing in ``study`` ('' if it may answer): the site's
        node config decides, a coordinator cannot switch its protection off."""
        if self.accepts(study):
            return ""
        if study.honest_sites > self.honest_sites:
            return (f"the study splits the noise {study.honest_sites} ways, and this site "
                    f"trusts at most {self.honest_sites} sites not to collude with the "
                    "coordinator (its honest-sites): run the study with honest-sites = "
                    f"{self.honest_sites} or fewer")
        if study.masked and study.trains and self.peer_keys and self.wrapped_context:
            return ("this site holds a CKKS context, so its model updates travel only "
                    "encrypted, and a masked deep study sends them in clear (masks hide its "
                    "quantile grid only): run the study with secure-aggregation = 'ckks'")
        kinds = [k for k, on in (("'ckks'", self.key_dir and self.wrapped_context),
                                 ("'masks' (marginal studies, deep studies' quantile grid)",
                                  self.peer_keys)) if on]
        return ("this site is set up for secure aggregation (its node config names its "
                "keys) and sends nothing in clear; run the study with secure-aggregation = "
                + " or ".join(kinds or ["'ckks'"]))

    def randomness(self, context: str = "") -> DPRandomness:
        """Where this site's DP mechanisms draw: secret unless a test seeded it.

        ``context`` (the study and round) only matters in reproducible mode, where it
        makes each round's draws differ; secret draws ignore it.
        """
        from .privacy.randomness import DPRandomness  # torch: only where DP runs

        if self.reproducible_noise_seed is None:
            return DPRandomness.secret()
        return DPRandomness.reproducible(self.reproducible_noise_seed, context)

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
            epsilon=_coerce("epsilon", node.get("epsilon", DEFAULT_EPSILON), float),
            delta=_coerce("delta", node.get("delta", DEFAULT_DELTA), float),
            dp=_coerce("dp", node.get("dp", True), bool),
            state_dir=str(node.get("state-dir", "")),
            noise_multiplier=(
                _coerce("noise-multiplier", node["noise-multiplier"], float)
                if "noise-multiplier" in node
                else None
            ),
            key_dir=str(node.get("key-dir", "")),
            holder_public_key=str(node.get("holder-public-key", "")),
            wrapped_context=str(node.get("wrapped-context", "")),
            peer_keys=str(node.get("peer-keys", "")),
            honest_sites=_coerce("honest-sites", node.get("honest-sites", 1), int),
            validation_scores=str(node.get("validation-scores", "none")),
            reproducible_noise_seed=(
                _coerce("reproducible-noise-seed", node["reproducible-noise-seed"], int)
                if "reproducible-noise-seed" in node
                else None
            ),
        )


#: Every node config key a fedsynth SuperNode reads (``SiteConfig.from_node_config``).
NODE_KEYS = ("site-name", *(f.name.replace("_", "-") for f in fields(SiteConfig)
                            if f.name != "name"), "torch-threads")


def check_strategy(strategy: str, secure_aggregation: str = "none") -> str:
    """Why ``strategy`` cannot run with ``secure_aggregation``, or '' when it can.

    Under encryption the coordinator can add ciphertexts and nothing else, so only an
    aggregate that is a weighted sum of the updates (FedAvg; FedProx, whose server side
    is FedAvg's) can be computed. The non-linear strategies get a reason, not just a
    list of allowed names, because "use FedAdam" is a reasonable thing to try.
    """
    key = strategy.lower().replace("-", "").replace("_", "")
    if secure_aggregation == "ckks" and key in NONLINEAR_STRATEGIES:
        return (
            f"strategy {strategy!r} cannot run with secure-aggregation = 'ckks': it is not "
            f"linear in the site updates (it needs {NONLINEAR_STRATEGIES[key]}), and the "
            "coordinator holds only ciphertexts it can add; use fedavg or fedprox, or turn "
            "encryption off"
        )
    if strategy not in STRATEGIES:
        return f"strategy must be one of {', '.join(STRATEGIES)}"
    return ""


def schema_fingerprint(schema: Schema) -> str:
    """A short hash of the schema, so sites refuse to train on a different one."""
    return hashlib.sha256(schema.to_json().encode()).hexdigest()[:16]


def _is_count(value: Any) -> bool:
    """A whole number >= 1 (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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
