"""The generator interface every model family implements.

A generator is built from a schema and hyperparameters only, so a coordinator can make
the initial global model without any data. Its whole state is one flat dict of arrays
under prefixed keys (``vae.encoder.0.weight``, ``gan.discriminator...``), which is one
Flower ArrayRecord: Flower's strategies aggregate exactly one array record per reply.
The user-facing shape is SDV's: ``fit`` / ``sample`` / ``save`` / ``load``.

Training goes through ``privacy.trainer.train_round`` and nowhere else: a generator
names the module that reads real rows (``private_module``) and its per-sample loss,
and the trainer decides whether that module is trained with DP-SGD.
"""

from __future__ import annotations

import io
import json
import numbers
import zipfile
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..encoding import TabularEncoder
from ..errors import FedsynthError
from ..privacy.randomness import NOT_A_DP_RELEASE, NOT_A_RELEASE, DPRandomness
from ..quantile_grid import DEFAULT_GRID_SHARE, grid_noise_for
from ..schema import Schema
from ..table import _match_category, conform

if TYPE_CHECKING:
    from ..privacy.release_noise import ReleaseNoise

FORMAT_VERSION = 1

#: The hyperparameter that carries the public quantile grid of the numeric columns
#: (``encoding.TabularEncoder``): set by the coordinator from the sites' DP histogram
#: release (``server/grid.py``) or by a central ``fit``; saved with the model, so a
#: loaded model decodes as it was trained. Absent: the public-bounds encoding.
GRID_PARAM = "numeric_grid"
#: Its companion: the heaps found in the same release (``quantile_grid.heaps_from_counts``),
#: which decoding puts back (``encoding.snap_heaps``). Absent: no heaps.
HEAPS_PARAM = "numeric_heaps"

#: ``fit_info``'s key for "this fit's DP draws were replayable" (every family's central
#: fit sets it; ``save`` reads it to label the file): one key, or a family's model goes
#: unlabelled.
FIT_REPRODUCIBLE = "reproducible-noise"
#: The label of a model fitted without DP (``epsilon=None``): its arrays hold exact
#: statistics of the rows (the outcome frequencies of ``cond.freq``, say).
NO_DP_RELEASE = f"no DP: {NOT_A_RELEASE}"

#: torch's Adam epsilon: every optimizer's unless a family sets ``federated_adam_eps``.
TORCH_ADAM_EPS = 1e-8


def fit_label(fit_info: dict[str, Any]) -> dict[str, str]:
    """The ``privacy`` label a central fit puts in its saved file, if it is no release.

    Replayable noise (anyone with the seed removes it) or no DP at all leaves exact
    statistics of the rows in the arrays; a file without this label would pass for a
    DP release. A model no central fit made (the coordinator's, whose label comes from
    the sites' replies: ``server/app.py``) has no ``epsilon`` in ``fit_info`` and gets none.
    """
    if fit_info.get(FIT_REPRODUCIBLE):
        return {"privacy": NOT_A_DP_RELEASE}
    if "epsilon" in fit_info and fit_info["epsilon"] is None:
        return {"privacy": NO_DP_RELEASE}
    return {}


@dataclass(frozen=True)
class TrainingSpec:
    """What the one trainer and the coordinator's update bound need of a generator.

    Declared by each generator (``Generator.training_spec``) rather than read out of
    its hyperparameters by key, so a renamed hyperparameter cannot silently change how
    it trains or what update the coordinator accepts.
    """

    lr: float  # Adam's learning rate on the private module
    # > 0: a round returns the moving average of its DP iterates (post-processing)
    iterate_ema: float = 0.0
    # every optimizer's learning rate (a GAN has two): the update bound takes the largest
    learning_rates: tuple[float, ...] = ()
    # optimizer steps per private step (a GAN's generator steps): the bound scales with it
    steps_per_batch: int = 1
    # Adam's epsilon in a site's federated round without DP (torch's default unless the
    # family says otherwise: the TVAE's ``federated_adam_eps``); DP-SGD and a central
    # fit keep the default. A larger epsilon only shortens Adam's steps, so the
    # coordinator's update bound still holds. Not every family's default, measured
    # (benchmarks/deep-spread/results-nodp.md, "ddpm and ctgan"): 0.3 undid the sign
    # vote of ddpm on heart disease too but cost it its survival fit on TCGA-BRCA
    # (C-index 0.709 -> 0.453, detection 0.648 -> 0.953), and on CTGAN's discriminator
    # (the optimizer this field sets; its generator's Adam is built in ``begin_round``)
    # it stalled the game: heart fidelity 0.902 -> 0.489, 0.716 with both at 0.3.
    federated_adam_eps: float = TORCH_ADAM_EPS

    @property
    def largest_lr(self) -> float:
        return max((self.lr, *self.learning_rates))


class ModelFileError(FedsynthError, ValueError):
    """A saved generator cannot be loaded; the message says why and what to do."""


class NotFittedError(FedsynthError, RuntimeError):
    """``sample`` on a model that was neither fitted nor loaded (SDV and scikit-learn say
    the same): its rows would be the random initial weights', schema-valid and
    meaningless."""


class ConditionError(FedsynthError, ValueError):
    """A sampling condition cannot be met under the schema, or by the model."""


@dataclass(frozen=True)
class Bound:
    """The values a numeric hyperparameter may take: ``low`` to ``high`` (``low``
    excluded when ``open_low``), whole numbers only when ``integer``; None passes when the
    default is None (the generator then picks). Checked when a generator is built, so a
    zero-width layer or a NaN learning rate is one message before any site trains, not
    a degenerate model (``hidden`` 0 built and trained a network that ignored its
    input) or a NaN loss rounds later."""

    low: float
    high: float = float("inf")
    integer: bool = False
    open_low: bool = False

    def problem(self, value: Any) -> str:
        """What is wrong with ``value`` ("" when nothing)."""
        kind = "a whole number" if self.integer else "a number"
        lo = f"> {self.low:g}" if self.open_low else f">= {self.low:g}"
        want = f"{kind} {lo}" + (f" and < {self.high:g}" if self.high != float("inf") else "")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return want
        v = float(value)
        if not np.isfinite(v) or (self.integer and v != int(v)):
            return want
        if v < self.low or (self.open_low and v == self.low) or v >= self.high:
            return want
        return ""


#: Bounds shared by the deep generators' hyperparameters.
POSITIVE, SHARE = Bound(0.0, open_low=True), Bound(0.0, 1.0)
#: A layer width, a count of bins or steps: bounded, since the coordinator sets it and a
#: site's memory in a round grows with it times its batch's rows (a round that runs out
#: of memory above some row count tells the coordinator that much; docs/privacy.md).
SIZE = Bound(1, 4097, integer=True)
#: A depth or a per-row multiplicity: the same reason, a smaller range.
SMALL_SIZE = Bound(1, 65, integer=True)
#: A whole number no site's per-row memory grows with (the marginal generator's plan).
COUNT = Bound(1, integer=True)
NON_NEGATIVE = Bound(0.0)


class Generator(ABC):
    """Base class: schema + hyperparameters in, DataFrames in the schema out."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    #: the numeric hyperparameters' bounds (``Bound``), checked before ``build``
    bounds: ClassVar[dict[str, Bound]] = {}
    #: Whether the coordinator's server momentum (FedAvgM) may step this model; a model
    #: whose training is a game between networks (a GAN) sets it False and gets plain
    #: FedAvg whatever the study's server momentum.
    server_momentum: ClassVar[bool] = True

    def __init__(self, schema: Schema, seed: int = 0, **hparams: Any) -> None:
        unknown = set(hparams) - set(self.defaults) - {GRID_PARAM, HEAPS_PARAM}
        if unknown:
            raise ValueError(
                f"{self.name} has no hyperparameter(s) {sorted(unknown)}; "
                f"known: {sorted(self.defaults)}"
            )
        self.schema = schema
        self.hparams: dict[str, Any] = {**self.defaults, **hparams}
        for key, bound in self.bounds.items():
            value = self.hparams[key]
            if value is None and self.defaults[key] is None:
                continue
            problem = bound.problem(value)
            if problem:
                raise ValueError(f"{self.name}: {key} must be {problem}, got {value!r}")
        try:
            self.encoder = TabularEncoder(schema, grid=self.hparams.get(GRID_PARAM),
                                          heaps=self.hparams.get(HEAPS_PARAM))
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from None
        self.seed = seed
        torch.manual_seed(seed)
        self.build()
        # set by fit, load and load_state_dict (the federated model is loaded each round)
        self.trained = False

    # -- what a model family provides -------------------------------------------------
    @abstractmethod
    def build(self) -> None:
        """Create the networks from ``self.encoder`` and ``self.hparams``."""

    @abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """Every network, by the prefix its keys carry in the flat state."""

    @abstractmethod
    def private_module(self) -> nn.Module:
        """The module whose training reads real rows; the one DP-SGD privatises."""

    @abstractmethod
    def per_sample_loss(self, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Loss of each row of ``batch`` (shape [n]), computed through ``module``."""

    @abstractmethod
    def generate_encoded(self, n: int, rng: torch.Generator) -> np.ndarray:
        """Draw ``n`` encoded rows (one-hot samples for categorical blocks)."""

    def training_spec(self) -> TrainingSpec:
        """How this generator trains; a family with more optimizers says so (CTGAN)."""
        lr = float(self.hparams.get("lr", 1e-3))
        return TrainingSpec(lr=lr, iterate_ema=float(self.hparams.get("iterate_ema", 0.0)),
                            federated_adam_eps=float(self.hparams.get(
                                "federated_adam_eps", TORCH_ADAM_EPS)))

    @property
    def loss_bound(self) -> float:
        """Per-sample losses are clipped to this before a DP loss report."""
        return float(self.hparams.get("loss_bound", 100.0))

    def statistics_column(self) -> str | None:
        """A categorical column whose DP histogram the model needs, or None.

        Sites release one noisy histogram of this column per study (Gaussian noise,
        L2 sensitivity 1 under adding or removing a row, charged to the ledger). Its sum
        is also the site's FedAvg weight, so the histogram costs nothing beyond the DP
        row count every site releases anyway. A conditional GAN uses it to draw its
        conditions at the real frequencies without touching the rows.
        """
        return None

    def set_statistics(self, histogram: np.ndarray) -> None:  # noqa: B027
        """Receive the site's noisy histogram (slots as ``encoder.categories``)."""

    def begin_round(self, seed: int) -> None:  # noqa: B027 (optional hook)
        """Set up per-round state (optimizers of non-private networks, for a GAN)."""

    def after_private_step(self, private: nn.Module) -> None:  # noqa: B027
        """Post-processing after each private step (a GAN's generator update)."""

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for prefix, net in self.networks().items():
            for key, value in net.state_dict().items():
                out[f"{prefix}.{key}"] = value.detach().cpu().numpy().copy()
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise ValueError(
                f"state does not fit this {self.name}: missing {missing[:5]}, extra {extra[:5]}"
            )
        for key, value in state.items():
            if tuple(np.shape(value)) != expected[key].shape:
                raise ValueError(
                    f"state key {key!r} has shape {np.shape(value)}, "
                    f"expected {expected[key].shape}"
                )
            if not np.all(np.isfinite(value)):
                raise ValueError(f"state key {key!r} holds NaN or infinite values")
        for prefix, net in self.networks().items():
            sub = {
                k[len(prefix) + 1 :]: torch.as_tensor(np.asarray(v))
                for k, v in state.items()
                if k.startswith(prefix + ".")
            }
            net.load_state_dict(sub)
        self.trained = True

    def num_parameters(self) -> int:
        return int(sum(v.size for v in self.state_dict().values()))

    # -- SDV-style API -----------------------------------------------------------------
    def fit_input(self, data: pd.DataFrame, epsilon: float | None,
                  delta: float) -> pd.DataFrame:
        """What every ``fit`` checks first, as scikit-learn does at its edge: the budget's
        numbers (``study.check_budget``) and the table against the schema (``table.conform``,
        the check a site runs on its file), typed.

        Why: before, a NaN or negative epsilon failed inside the grid planner ("grid_noise_for
        needs epsilon > 0"), an empty table inside Opacus' sampler, a missing column as a
        bare KeyError, and a column of words where the schema says numbers was fitted as
        all missing, silently."""
        from ..study import check_budget

        if epsilon is not None:
            check_budget(epsilon, delta, f"{self.name}.fit")
        if not isinstance(data, pd.DataFrame):
            raise TypeError(f"{self.name}.fit takes a pandas DataFrame, not "
                            f"{type(data).__name__}")
        return conform(data, self.schema)

    def fit(
        self,
        data: pd.DataFrame,
        *,
        epochs: int = 50,
        sample_rate: float = 0.1,
        epsilon: float | None = None,
        delta: float = 1e-5,
        max_grad_norm: float = 1.0,
        count_noise: float = 10.0,
        accountant: str = "rdp",
        randomness: DPRandomness | None = None,
        grid_share: float | None = DEFAULT_GRID_SHARE,
    ) -> Generator:
        """Train centrally on a typed frame, with DP when ``epsilon`` is given.

        The DP noise and the Poisson batches come from ``randomness``: the OS CSPRNG by
        default; ``DPRandomness.reproducible(seed)`` in tests and benchmarks only (the
        model is then not a DP release, and ``fit_info`` and the saved file say so). The
        marginal generator's ``fit`` takes the same argument.

        The same trainer, accountant and count release as a federated site, so central
        and federated figures are comparable: a model with a statistics column gets its
        histogram released as a site releases it (Gaussian noise of std ``count_noise``
        per cell under DP, exact without), and the training noise is calibrated so that
        histogram and training together stay within ``epsilon`` in one ledger. Under DP
        the count release is made for every model (one cell, the row count, without a
        statistics column) and DP-SGD divides its noisy sum by ``sample_rate`` times
        that DP count, as a site does: divided by the exact row count, the published
        weights were a function of a private statistic outside the DP analysis.

        Before training, the numeric columns' quantile grid is estimated as a study's
        sites estimate it (``quantile_grid``, the same two functions on the pooled rows:
        a noisy histogram taking ``grid_share`` of ``epsilon`` under DP, exact without,
        charged to the same ledger); ``grid_share=None`` keeps the public-bounds
        encoding.
        """
        from ..privacy import DPSettings, PrivacyLedger, train_round
        from ..privacy.plan import PrivacyPlan
        data = self.fit_input(data, epsilon, delta)
        rand = randomness if randomness is not None else DPRandomness.secret()
        bounds = TabularEncoder(self.schema)
        encoded = bounds.encode(data)
        released = self.statistics_column() is not None
        grid_noise = None
        if grid_share and epsilon is not None:
            grid_noise = grid_noise_for(epsilon, delta, grid_share)
        dp = None
        ledger = None
        if epsilon is not None:
            plan = PrivacyPlan(sample_rate=sample_rate, local_epochs=epochs, rounds=1,
                               loss_report=False, count_noise=count_noise,
                               accountant=accountant, grid_noise=grid_noise)
            plan.check(epsilon, delta, who="this fit")
            sigma = plan.noise_for(epsilon, delta)
            dp = DPSettings(noise_multiplier=sigma, max_grad_norm=max_grad_norm)
            ledger = PrivacyLedger(accountant)
        if grid_share:
            encoded = self._fit_grid(bounds, encoded, grid_noise, rand, ledger)
        rows = None  # DP-SGD divides by q x rows: under DP, the DP count (as a site)
        if released or dp is not None:
            noise = count_noise if epsilon is not None else None
            histogram = release_histogram(self, encoded, noise, rand.release("count-release"))
            if released:
                self.set_statistics(histogram)
            if ledger is not None:
                ledger.record(count_noise, 1.0, 1)
                rows = max(1.0, float(round(histogram.sum())))
        stats = train_round(
            self,
            encoded,
            epochs=epochs,
            sample_rate=sample_rate,
            dp=dp,
            ledger=ledger,
            randomness=rand,
            rows=rows,
        )
        self.fit_info = {
            FIT_REPRODUCIBLE: rand.is_reproducible,
            "steps": stats.steps,
            "seconds": stats.seconds,
            "epsilon": ledger.epsilon(delta) if ledger is not None else None,
            "delta": delta if ledger is not None else None,
        }
        self.trained = True
        return self

    def _fit_grid(self, bounds: TabularEncoder, encoded: np.ndarray, noise: float | None,
                  rand: DPRandomness, ledger: Any) -> np.ndarray:
        """A central fit's grid release (one 'site', the pooled rows) and the rows
        moved onto it; charged to ``ledger`` under DP."""
        from .. import quantile_grid

        counts = quantile_grid.release(bounds, encoded, noise, rand.release("grid-release"))
        total_std = 0.0 if noise is None else quantile_grid.cell_std(self.schema, noise)
        self.set_grid(quantile_grid.grid_from_counts(self.schema, counts, total_std),
                      quantile_grid.heaps_from_counts(self.schema, counts, total_std))
        if ledger is not None and noise is not None:
            ledger.record(noise, 1.0, 1)
        return self.encoder.reencode(encoded, bounds)

    def set_grid(self, grid: dict[str, list[float]] | None,
                 heaps: dict[str, list[list[float]]] | None = None) -> None:
        """Use ``grid`` (public: derived from DP releases) to encode numeric columns, and
        ``heaps`` to decode them; both are kept in ``hparams`` so the saved model and the
        sites' copies decode alike. Untrained weights are reset: call it before
        training."""
        self.hparams[GRID_PARAM] = grid
        self.hparams[HEAPS_PARAM] = heaps or {}
        self.encoder = TabularEncoder(self.schema, grid=grid, heaps=heaps)
        # rebuilt, as if constructed with the grid: a family's networks may depend on
        # the encoding (the TVAE's starting scales, ddpm's numeric scale)
        torch.manual_seed(self.seed)
        self.build()
        self.trained = False

    def sample(
        self,
        n: int,
        conditions: dict[str, Any] | None = None,
        seed: int | None = None,
        max_tries: int = 200,
        interventions: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Exactly ``n`` rows in the schema, all satisfying ``conditions`` if given.

        Conditions are met by rejection: draw, keep the rows that match, repeat. A
        condition the schema makes impossible is an error at once; one the model almost
        never produces is an error after ``max_tries`` batches, with the rate seen.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        if interventions:
            from ..causal import CausalError

            raise CausalError(
                f"the {self.name} generator does not follow a causal graph, so it cannot "
                "sample interventions (do(column = value)); use the marginal generator "
                "with a schema that publishes a 'graph' section (docs/causal.md)")
        if not self.trained:
            raise NotFittedError(f"this {self.name} model is neither fitted nor loaded: "
                                 "fit it (.fit) or load a saved one (Generator.load) first")
        rng = torch.Generator().manual_seed(self.seed if seed is None else seed)
        wanted = self._parse_conditions(conditions or {})
        kept: list[pd.DataFrame] = []
        have, drawn = 0, 0
        batch = max(n, 256)
        for _ in range(max_tries):
            if have >= n:
                break
            frame = self.encoder.decode(self.generate_encoded(batch, rng))
            drawn += len(frame)
            if wanted:
                mask = np.ones(len(frame), dtype=bool)
                for col, value in wanted.items():
                    mask &= _equals(frame[col], value)
                frame = frame[mask]
            kept.append(frame)
            have += len(frame)
        if have < n:
            raise ConditionError(
                f"the model produced {have} of {n} rows matching {conditions} in {drawn} "
                f"draws (rate {have / max(drawn, 1):.2e}); the condition is too rare for "
                "this model: ask for fewer rows or a more common condition"
            )
        out = pd.concat(kept, ignore_index=True).iloc[:n].reset_index(drop=True)
        return out

    def sample_balanced(
        self, n: int, column: str, seed: int | None = None, max_tries: int = 200
    ) -> pd.DataFrame:
        """``n`` rows with equal numbers of each category of ``column`` (cohort balancing).

        The under-represented class (a rare subtype, one sex, relapsed patients) gets as
        many rows as the others; each class is drawn conditionally, so within a class
        the joint distribution is the model's.
        """
        try:
            col = self.schema.column(column)
        except KeyError as exc:
            raise ConditionError(exc.args[0]) from None
        if not col.is_categorical:
            raise ConditionError(f"--balance needs a categorical column; {column!r} is {col.kind}")
        cats = list(col.categories)
        sizes = [n // len(cats) + (1 if i < n % len(cats) else 0) for i in range(len(cats))]
        base = self.seed if seed is None else seed
        parts = [
            self.sample(k, conditions={column: cat}, seed=base + i, max_tries=max_tries)
            for i, (cat, k) in enumerate(zip(cats, sizes, strict=True))
            if k > 0
        ]
        frame = pd.concat(parts, ignore_index=True)
        order = np.random.default_rng(base).permutation(len(frame))
        return frame.iloc[order].reset_index(drop=True)

    def _parse_conditions(self, conditions: dict[str, Any]) -> dict[str, Any]:
        parsed: dict[str, Any] = {}
        for col, value in conditions.items():
            try:
                column = self.schema.column(col)
            except KeyError as exc:
                raise ConditionError(exc.args[0]) from None
            if value is None or (isinstance(value, float) and np.isnan(value)):
                if not column.nullable:
                    raise ConditionError(f"column {col!r} is never missing under the schema")
                parsed[col] = None
            elif column.is_categorical:
                try:
                    parsed[col] = _match_category(value, column)
                except KeyError:
                    raise ConditionError(
                        f"{col}={value!r} is impossible: categories are {list(column.categories)}"
                    ) from None
            else:
                # --conditions is JSON: a word or a list arrives as readily as a number
                try:
                    num = float(value)
                except (TypeError, ValueError):
                    raise ConditionError(
                        f"column {col!r} holds numbers ({column.kind}): its condition "
                        f"must be a number in [{column.min:g}, {column.max:g}], got "
                        f"{value!r}") from None
                if not (column.min <= num <= column.max):  # type: ignore[operator]
                    raise ConditionError(
                        f"{col}={value!r} is outside the schema's domain "
                        f"[{column.min:g}, {column.max:g}]"
                    )
                if column.kind == "integer" and num != round(num):
                    raise ConditionError(f"{col} is an integer column; {value!r} is impossible")
                parsed[col] = num
        return parsed

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """One file: arrays as .npy entries plus JSON metadata; nothing executable.

        Written to a temporary name and renamed, so a crash mid-save leaves the previous
        file (a checkpoint, say) intact.
        """
        path = Path(path)
        meta = {
            **(extra or {}),
            **fit_label(getattr(self, "fit_info", None) or {}),
            "format": FORMAT_VERSION,
            "generator": self.name,
            "hparams": self.hparams,
            "seed": self.seed,
            "schema": self.schema.to_dict(),
        }
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("meta.json", json.dumps(meta, indent=1))
            for key, value in self.state_dict().items():
                buf = io.BytesIO()
                np.save(buf, value, allow_pickle=False)
                zf.writestr(f"arrays/{key}.npy", buf.getvalue())
        tmp.replace(path)

    @staticmethod
    def read_meta(path: str | Path) -> dict[str, Any]:
        """The JSON metadata of a saved model (round, history for a checkpoint)."""
        try:
            with zipfile.ZipFile(path) as zf:
                return dict(json.loads(zf.read("meta.json")))
        except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
            raise ModelFileError(f"model file {path} is corrupt or not a fedsynth model ({exc})"
                                 ) from None

    @staticmethod
    def load(path: str | Path) -> Generator:
        from . import get_generator

        path = Path(path)
        hint = "pass the model.fsg file that a fedsynth study wrote"
        if path.is_dir():
            raise ModelFileError(f"model file {path} is a folder; {hint} (e.g. "
                                 f"{path / 'model.fsg'})")
        if not path.is_file():
            raise ModelFileError(f"model file {path} does not exist; {hint}")
        try:
            with zipfile.ZipFile(path) as zf:
                meta = json.loads(zf.read("meta.json"))
                state = {
                    name[len("arrays/") : -len(".npy")]: np.load(
                        io.BytesIO(zf.read(name)), allow_pickle=False
                    )
                    for name in zf.namelist()
                    if name.startswith("arrays/")
                }
        # zlib.error: a flipped byte inside a compressed entry (a bad disk or transfer)
        except (zipfile.BadZipFile, zlib.error, KeyError, ValueError, OSError,
                EOFError) as exc:
            raise ModelFileError(
                f"model file {path} is corrupt or not a fedsynth model ({exc}); {hint}"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ModelFileError(f"model file {path} has unknown format {found}; {hint}")
        try:
            schema = Schema.from_dict(meta["schema"], source=str(path))
            cls = get_generator(meta["generator"])
            model = cls(schema, seed=int(meta.get("seed", 0)), **meta["hparams"])
        except FedsynthError:  # a bad schema or generator name: their messages say it
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"model file {path} is corrupt: its metadata does not "
                                 f"describe a model ({exc!r}); {hint}") from None
        try:
            model.load_state_dict(state)
        except ValueError as exc:
            raise ModelFileError(f"model file {path} is corrupt: {exc}") from None
        return model


def _equals(series: pd.Series, value: Any) -> np.ndarray:
    if value is None:
        return series.isna().to_numpy()
    if isinstance(value, float):
        num = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        return np.isclose(num, value)
    return np.array([v == value for v in series.tolist()], dtype=bool)


def release_histogram(
    model: Generator, data: np.ndarray, noise_std: float | None, noise: ReleaseNoise | None
) -> np.ndarray:
    """A site's one count release: a histogram of the model's statistics column.

    Adding or removing a patient changes one cell by one (L2 sensitivity 1), so with
    Gaussian noise of std ``noise_std`` per cell it is the Gaussian mechanism at noise
    multiplier ``noise_std``, whatever the number of cells; with no statistics column it
    is a single cell, the row count. ``noise_std=None`` (no DP) gives the exact counts.
    ``noise`` must be secret to the site (``DPRandomness.release("count-release")``,
    the discrete Gaussian): a coordinator that can replay it reads the exact counts.
    """
    column = model.statistics_column()
    if column is None:
        exact = np.array([float(len(data))])
    else:
        block = model.encoder.block(column, "onehot")
        exact = data[:, block.slice].sum(axis=0).astype(float)
    if noise_std is None:
        return exact
    if noise is None:
        raise ValueError("a DP count release needs the site's secret randomness")
    return noise.add(exact, noise_std, integral=True)
