"""The ``fedsynth`` command: a thin layer over the Python API (``import fedsynth``).

Subcommands: ``simulate`` (a whole study on this machine, on a bundled dataset or your
own tables), ``benchmark`` (settings, baselines and costs side by side;
``docs/benchmark.md``), ``check`` (a site's table against the schema), ``schema draft``
(a first schema from a table, to review), ``sample`` (draw rows from a saved
generator), ``validate`` (score synthetic data against real data), ``keys`` (encryption
keys of a study), ``certs`` (TLS and SuperNode authentication material), ``preflight``
(a site's checks before it joins a deployed study), ``site-runtime`` (a site's
long-lived ClientApp runtime beside its SuperNode).

Errors a user can fix (bad input, a missing file, a corrupt model) end with one
message naming the problem and what to do, and exit code 2; nothing is written. A
study that ran exits 0 whatever its verdict, unless ``--strict`` (then 1 on a failing
verdict, for pipelines).

Imports are lazy: torch, opacus and Flower take seconds to load, and ``--help`` or a
mistyped argument should answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .common.errors import FedsynthError
from .common.study import (
    DEFAULT_DELTA,
    DEFAULT_EPSILON,
    SECURE_AGGREGATION,
    SEED_RANGE,
    ConfigError,
    StudyConfig,
)

if TYPE_CHECKING:
    from rich.console import Console

EXIT_USAGE = 2
EXIT_VERDICT = 1  # --strict: the study ran and its verdict fails
# The generators' registered names (common/generators REGISTRY; a test checks they
# match): the registry itself imports torch, which --help must not wait for.
GENERATORS = ("ctgan", "ddpm", "marginal", "tvae")
ENGINES = ("inprocess", "ray")  # simulations/engines.py (a test checks they match)
#: Seeds go to numpy, torch and scikit-learn alike (the one range: ``study.SEED_RANGE``).
SEED_MAX = SEED_RANGE[1]
#: ``fedsynth sample`` draws every row in one batch: about 1.3 GB of memory per million
#: rows (TVAE, heart disease), so past ten million a laptop runs out of memory and the
#: allocator's error would say nothing about -n. More rows: run again with another seed.
MAX_SAMPLE_ROWS = 10_000_000


def seed_arg(text: str) -> int:
    """An argparse type for ``--seed``: a whole number every random generator accepts.

    Checked where it enters, so a negative or huge seed is named as such instead of
    failing later inside numpy, torch or scikit-learn with their own words.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is a whole number, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(
            f"a seed is a whole number from 0 to {SEED_MAX}, got {text}")
    return value


def _output_file(path: Path, force: bool, example: str) -> None:
    """Refuse an output file path before any work: a folder, a missing parent folder,
    or (without ``--force``) an existing file, so nothing is written or left behind.

    A folder used to get "exists; pass --force", and --force then failed on it after
    the work was done, leaving a temporary file beside it.
    """
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; give a file name, e.g. "
                          f"{path / example}")
    if not path.parent.is_dir():
        raise ConfigError(f"--out {path}: the folder {path.parent} does not exist; "
                          "create it first or choose another path")
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    d = StudyConfig()
    p = sub.add_parser(
        "simulate",
        help="run a multicentre study on this machine (default: 4 heart-disease hospitals; "
        "your own tables with --schema and --data)",
        description="Federated, DP synthetic-data study: the real ServerApp and ClientApp, "
        "one simulated site per hospital, validation against held-out patients, a verdict.",
    )
    p.add_argument("--dataset", default="heart_disease",
                   help="bundled dataset: heart_disease, tcga_brca, amlsg, mimic3_demo")
    p.add_argument("--schema", default=None,
                   help="your study's schema (YAML/JSON; draft one with `fedsynth schema "
                   "draft`); goes with --data")
    p.add_argument("--data", default="",
                   help="your tables: a folder with one CSV/Parquet file per site (the file "
                   "name is the site), or one table with --site-column")
    p.add_argument("--site-column", default="",
                   help="the column of --data TABLE that names each row's site (dropped "
                   "before training)")
    p.add_argument("--target", default="", metavar="COLUMN[=V1,V2]",
                   help="the label TSTR predicts (default: the schema's outcome); a "
                   "categorical target names its positive values after =")
    p.add_argument("--sites", default="",
                   help="comma-separated subset of the dataset's sites (default: all)")
    p.add_argument("--site-epsilon", action="append", default=[], metavar="SITE=EPS",
                   help="a site's own budget, overriding --epsilon (repeatable)")
    p.add_argument("--rounds", type=int, default=d.num_server_rounds, help="federated rounds")
    p.add_argument("--local-epochs", type=int, default=d.local_epochs,
                   help="local epochs per round (steps = epochs / sample rate)")
    p.add_argument("--sample-rate", type=float, default=d.sample_rate,
                   help="Poisson sampling rate q of DP-SGD (expected batch = q x rows)")
    p.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON,
                   help="privacy budget of each site")
    p.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="delta of each site")
    p.add_argument("--no-dp", action="store_true",
                   help="train without differential privacy (a baseline, never for release)")
    p.add_argument("--reproducible-noise", action="store_true",
                   help="draw every site's DP noise from a seed, for tests and benchmarks: the "
                        "outputs are then labelled 'not a DP release'")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help="per-sample gradient clipping norm")
    p.add_argument("--accountant", choices=["rdp", "prv"], default=d.accountant)
    p.add_argument("--generator", choices=GENERATORS, default=d.generator)
    p.add_argument("--generator-params", default="{}",
                   help='JSON hyperparameters, e.g. \'{"hidden": 64, "latent": 16}\'')
    p.add_argument("--strategy", choices=["fedavg", "fedprox"], default=d.strategy)
    p.add_argument("--secure-aggregation", choices=list(SECURE_AGGREGATION),
                   default=d.secure_aggregation,
                   help="ckks: sites send CKKS-encrypted updates the coordinator can only add; "
                   "masks: pairwise-masked counts only their sum unmasks (the marginal "
                   "generator's measurements, a deep generator's quantile grid; its model "
                   "updates stay in clear); keys are set up in OUT/keys, docs/encryption.md")
    p.add_argument("--honest-sites", type=int, default=1,
                   help="with --secure-aggregation masks: each site trusts this many sites "
                   "(itself included) not to collude with the coordinator and adds 1/N of "
                   "the study's common noise variance (default 1: its whole noise; "
                   "docs/privacy.md, 'Distributed noise')")
    p.add_argument("--proximal-mu", type=float, default=0.01,
                   help="FedProx mu (used with --strategy fedprox)")
    p.add_argument("--server-momentum", type=float, default=d.server_momentum,
                   help="the coordinator's momentum on the averaged update (FedAvgM; free "
                   "privacy-wise; 0 = plain FedAvg; not used under CKKS)")
    p.add_argument("--server-lr", type=float, default=d.server_lr,
                   help="the coordinator's learning rate on the averaged update")
    p.add_argument("--federated-validation", action="store_true",
                   help="after the study, every site also scores the synthetic table "
                   "against its own rows and sends back scores only")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of each site's rows held back for validation")
    p.add_argument("--n-synthetic", type=int, default=0,
                   help="rows to sample (default: about the number of training rows)")
    p.add_argument("--out", default=d.output_dir, help="output folder")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier study's outputs in --out")
    p.add_argument("--seed", type=seed_arg, default=d.seed)
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out instead of round 0")
    p.add_argument("--engine", choices=ENGINES, default=ENGINES[0],
                   help="inprocess: the real apps in this process (fast, default); ray: "
                   "Flower's simulation engine, sites in parallel")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when the verdict fails (default: 0 whenever the study ran)")
    p.add_argument("--verbose", action="store_true",
                   help="show Flower's and Ray's own log (else it goes to OUT/fedsynth.log)")


def _target(spec: str) -> tuple[str, tuple[str, ...]]:
    column, _, values = spec.partition("=")
    return column.strip(), tuple(v.strip() for v in values.split(",") if v.strip())


def _run_simulate(args: argparse.Namespace, console: Console) -> int:
    from .simulations.simulate import SimulationOptions, simulate

    study = StudyConfig.from_flat(
        {
            "num-server-rounds": args.rounds,
            "local-epochs": args.local_epochs,
            "sample-rate": args.sample_rate,
            "generator": args.generator,
            "generator-params": args.generator_params,
            "strategy": args.strategy,
            "proximal-mu": args.proximal_mu if args.strategy == "fedprox" else 0.0,
            "max-grad-norm": args.max_grad_norm,
            "accountant": args.accountant,
            "seed": args.seed,
            "output-dir": args.out,
            "n-synthetic": args.n_synthetic,
            "resume": args.resume,
            "secure-aggregation": args.secure_aggregation,
            "honest-sites": args.honest_sites,
            "server-momentum": args.server_momentum,
            "server-lr": args.server_lr,
            "federated-validation": args.federated_validation,
        }
    )
    site_eps: dict[str, float] = {}
    for item in args.site_epsilon:  # the numbers themselves: simulate's check_budgets
        name, sep, value = item.partition("=")
        try:
            site_eps[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ConfigError(f"--site-epsilon takes SITE=EPSILON with EPSILON > 0, got {item!r}")
    if not 0 < args.holdout < 1:
        raise ConfigError(f"--holdout is a share of each site's rows in (0, 1), got "
                          f"{args.holdout}")
    if (args.schema or args.site_column) and not args.data:
        raise ConfigError("--schema and --site-column describe your own tables: pass them "
                          "with --data DIR (one table per site) or --data TABLE")
    target, positive = _target(args.target)
    opts = SimulationOptions(
        dataset=args.dataset,
        sites=tuple(s for s in args.sites.split(",") if s),
        site_epsilon=site_eps,
        epsilon=args.epsilon,
        delta=args.delta,
        dp=not args.no_dp,
        holdout=args.holdout,
        study=study,
        verbose=args.verbose,
        reproducible_noise=args.reproducible_noise,
        schema=args.schema,
        data=args.data,
        site_column=args.site_column,
        target=target,
        positive=positive,
        engine=args.engine,
        force=args.force,
    )
    summary = simulate(opts, console)
    return EXIT_VERDICT if args.strict and not summary["verdict"]["passed"] else 0


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="compare central, site-alone and federated (DP, encrypted) training with "
        "baselines; see docs/benchmark.md",
        description="Run the benchmark settings and write results.csv, results.md and plots.",
    )
    p.add_argument("--quick", action="store_true",
                   help="every setting on one seed with shorter training and fewer "
                   "validation areas (heart disease: under 15 minutes on 2 cores)")
    p.add_argument("--part", default="settings",
                   help="comma-separated: settings (the comparison), throughput (rows/s, "
                   "DP overhead, grad-sample modes, the ctgan package), scale (10/50/100 sites)")
    p.add_argument("--dataset", default="heart_disease",
                   help="heart_disease, tcga_brca, amlsg or mimic3_demo")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3; --quick 1)")
    p.add_argument("--seed", type=seed_arg, default=0, help="first seed")
    p.add_argument("--dirichlet-alpha", type=float, default=None,
                   help="re-split the pooled rows into sites by Dirichlet(alpha) label shares")
    p.add_argument("--dirichlet-sites", type=int, default=0,
                   help="sites of the Dirichlet split (default: the dataset's count)")
    p.add_argument("--generators", default="tvae,ctgan,ddpm,marginal")
    p.add_argument("--epsilons", default="1,3,10", help="per-site budgets of the DP runs")
    p.add_argument("--rounds", type=int, default=None, help="default 10; --quick 5")
    p.add_argument("--local-epochs", type=int, default=None, help="default 20; --quick 10")
    p.add_argument("--alone-sites", type=int, default=None,
                   help="site-alone settings for this many sites spread over the sizes "
                   "(default: every site; --quick 3)")
    p.add_argument("--baselines", default="independent,sdv_ctgan,sdv_tvae,sdv_gaussian_copula")
    p.add_argument("--baseline-epochs", type=int, default=None,
                   help="epochs of the ctgan package's models (default: theirs; --quick 50)")
    p.add_argument("--anonymeter", action=argparse.BooleanOptionalAction, default=None,
                   help="anonymeter attacks (default: on in full runs when "
                   "FEDSYNTH_ANONYMETER_PYTHON is set; off with --quick)")
    p.add_argument("--ray-check", action=argparse.BooleanOptionalAction, default=None,
                   help="rerun one setting through `fedsynth simulate` (Ray) and compare "
                   "(default: on)")
    p.add_argument("--scale-dataset", default="amlsg", help="table split for --part scale")
    p.add_argument("--scale-sites", default="10,50,100", help="site counts for --part scale")
    p.add_argument("--only", default="",
                   help="comma-separated setting keys to run (e.g. tvae/federated/eps3)")
    p.add_argument("--honest-sites", default="",
                   help="also run each generator federated under masked sums with "
                   "distributed noise (the marginal generator's counts, a deep one's "
                   "quantile grid), each site trusting this many sites (comma-separated, "
                   "'all' for every site; docs/privacy.md, 'Distributed noise')")
    p.add_argument("--keep-work", action="store_true",
                   help="keep OUT/work (site files with real rows, models) for inspection")
    p.add_argument("--reproducible-noise", action="store_true",
                   help="derive every site's DP noise and training draws from the seed, so a "
                   "run repeats byte for byte; its outputs are not a DP release")
    p.add_argument("--out", default="benchmark-output", help="output folder")


def _run_benchmark(args: argparse.Namespace, console: Console) -> int:
    from .simulations.benchmark_cli import benchmark_from_args

    return benchmark_from_args(args, console)


def _run_check(args: argparse.Namespace, console: Console) -> int:
    from .common.schema import Schema
    from .common.table import read_table

    schema = Schema.load(args.schema)
    frame = read_table(args.data, schema)
    missing = int(frame.isna().sum().sum())
    console.print(
        f"{args.data}: OK against schema {schema.name!r}: {len(frame)} rows, "
        f"{len(frame.columns)} columns, {missing} missing values (modelled, not dropped)"
    )
    return 0


def _conditions(text: str) -> dict | None:
    """``--conditions`` as a dict of column values, or a message naming the option."""
    if not text:
        return None
    example = "write it as a JSON object, e.g. '{\"sex\": 0}'"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--conditions is not valid JSON ({exc}); {example}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--conditions must map columns to values; {example}")
    return value


def _warn_if_not_a_release(model: str) -> None:
    """One warning line on stderr when the model file's label says it is no DP release.

    Rows drawn from it look like any synthetic table, and nothing downstream reads the
    file's metadata: this is the last point where the user is told the rows carry no
    guarantee (replayable noise, or no DP). The exit code stays 0; sampling such a
    model is legitimate in tests and benchmarks.
    """
    from rich.console import Console
    from rich.markup import escape

    from .common.generators import Generator
    from .common.privacy.randomness import is_not_a_release

    label = Generator.read_meta(model).get("privacy")
    if is_not_a_release(label):
        Console(stderr=True).print(
            f"[yellow]warning:[/yellow] {escape(model)} is labelled \"{escape(str(label))}\": "
            "rows drawn from it carry no differential privacy guarantee; do not publish "
            "them as DP synthetic data", highlight=False)


def _run_sample(args: argparse.Namespace, console: Console) -> int:
    from .common.causal import CausalError, parse_interventions

    if not 1 <= args.n <= MAX_SAMPLE_ROWS:
        raise ConfigError(f"-n is the number of rows to draw: a whole number >= 1 and at "
                          f"most {MAX_SAMPLE_ROWS:,} (for more, run again with another "
                          f"--seed), got {args.n}")
    out = Path(args.out)
    _output_file(out, args.force, "synthetic.csv")
    conditions = _conditions(args.conditions)
    from .common.generators import Generator

    model = Generator.load(args.model)
    _warn_if_not_a_release(args.model)
    interventions = parse_interventions(args.intervene) if args.intervene else None
    if interventions:  # do(column = value): see docs/causal.md
        if args.balance:
            raise ConfigError("use either --balance or --intervene, not both")
        if getattr(model, "graph", None) is None:
            raise CausalError(
                f"{args.model} holds a {model.name} model that does not follow a causal "
                "graph, so --intervene cannot apply: fit the marginal generator with "
                "causal=true on a schema with a 'graph' section (docs/causal.md)")
        frame = model.sample(args.n, conditions=conditions, seed=args.seed,
                             interventions=interventions)
    elif args.balance:
        if conditions:
            raise ConfigError("use either --balance or --conditions, not both")
        frame = model.sample_balanced(args.n, args.balance, seed=args.seed)
    else:
        frame = model.sample(args.n, conditions=conditions, seed=args.seed)
    tmp = out.with_name(out.name + ".tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(out)
    console.print(f"wrote {len(frame)} synthetic rows to {out}")
    return 0


VALIDATE_OUTPUTS = ("validation.json", "report.html")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # a missing file: read_table names it
        return False


def _run_validate(args: argparse.Namespace, console: Console) -> int:
    out = Path(args.out)
    taken = [n for n in VALIDATE_OUTPUTS if (out / n).exists()]
    if taken and not args.force:
        raise FileExistsError(f"{out} already holds {', '.join(taken)}; pass --force to "
                              "replace them or choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a folder")
    if _same_file(args.real, args.holdout):
        # Every privacy figure compares the synthetic rows' distance to the training
        # rows with their distance to the holdout: one file as both always "passes".
        raise ConfigError(
            f"--real and --holdout are the same file ({args.holdout}): the holdout must be "
            "real rows the generator never saw (fedsynth simulate writes real/holdout.csv "
            "beside real/train.csv)")
    from .common.schema import Schema
    from .common.table import read_table
    from .common.validation import validate
    from .common.validation.report import write_report
    from .common.validation.verdict import verdict
    from .simulations.simulate import headline_text, print_verdict

    schema = Schema.load(args.schema)
    real = read_table(args.real, schema)
    hold = read_table(args.holdout, schema)
    syn = read_table(args.synthetic, replace(schema, header=args.synthetic_header))
    target, positive = _target(args.target)
    try:
        result = validate(real, hold, syn, schema, seed=args.seed, target=target or None,
                          positive=positive or None,
                          survival=schema.survival_pairs[0] if schema.survival_pairs else None,
                          anonymeter_python=os.environ.get("FEDSYNTH_ANONYMETER_PYTHON") or None)
    except (KeyError, ValueError) as exc:
        raise ConfigError(str(exc).strip("'\"")) from None
    out.mkdir(parents=True, exist_ok=True)
    judged = verdict(result)
    (out / "validation.json").write_text(
        json.dumps({**result.to_dict(), "verdict": judged.to_dict()}, indent=1, default=str))
    write_report(result, out / "report.html", real_train=real, synthetic=syn, schema=schema,
                 title=f"fedsynth validation: {schema.name}", extra=None)
    console.print(headline_text(result.headline()))
    console.print(f"wrote {out}/validation.json and {out}/report.html")
    print_verdict(console, judged.to_dict(), f"{out}/report.html")
    return EXIT_VERDICT if args.strict and not judged.passed else 0


def _run_schema(args: argparse.Namespace, console: Console) -> int:
    from .common.schema_draft import draft_inputs, draft_schema_file

    out = Path(args.out)
    draft_inputs(args.tables, out)
    _output_file(out, args.force, "schema.yaml")
    draft = draft_schema_file(args.tables, out, site_column=args.site_column or None,
                              name=args.name or None)
    console.print(
        f"wrote {out}: {draft.columns} columns; {len(draft.marked)} with bounds copied from "
        "the rows, marked 'to_review'. Replace each with a public, domain-knowledge bound "
        "and delete the mark: simulate and the sites refuse the schema until then."
    )
    for line in draft.hints:
        console.print(f"  - {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsynth",
        description="Federated, differentially private synthetic patient data.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    _add_benchmark(sub)

    p = sub.add_parser("check", help="check a site's table against the study schema")
    p.add_argument("--schema", required=True, help="the study's schema (YAML or JSON)")
    p.add_argument("--data", required=True, help="the site's table (CSV or Parquet)")

    p = sub.add_parser("schema", help="draft a schema from your tables (`schema draft -h`)")
    schema_sub = p.add_subparsers(dest="schema_command", required=True)
    d = schema_sub.add_parser(
        "draft",
        help="propose a schema (kinds, categories, missing markers) from tables",
        description="Propose each column's kind, categories and missing-value markers from "
        "one or more tables (files, or a folder of one table per site). Bounds seen in the "
        "rows would publish their outliers, so each is marked 'to_review': replace it with a "
        "public, domain-knowledge bound; simulate and the sites refuse the draft until then.",
    )
    d.add_argument("tables", nargs="+", metavar="TABLE",
                   help="CSV/Parquet file(s) or a folder of them")
    d.add_argument("--site-column", default="",
                   help="a column naming each row's site: left out of the schema")
    d.add_argument("--name", default="", help="the study's name (default: from the file)")
    d.add_argument("--out", required=True, help="where to write the draft (YAML)")
    d.add_argument("--force", action="store_true", help="overwrite --out if it exists")

    p = sub.add_parser("sample", help="draw synthetic rows from a saved generator")
    p.add_argument("--model", required=True, help="model.fsg written by a study")
    p.add_argument("-n", type=int, required=True, help="number of rows")
    p.add_argument("--conditions", default="",
                   help='JSON column values every row must have, e.g. \'{"sex": 0}\'')
    p.add_argument("--balance", default="", metavar="COLUMN",
                   help="equal numbers of rows for each category of COLUMN")
    p.add_argument("--intervene", action="append", default=[], metavar="COLUMN=VALUE",
                   help="do(COLUMN = VALUE): set it, cut its causes, redraw its effects "
                        "(a model that follows a causal graph; repeatable)")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--out", default="synthetic.csv")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")

    p = sub.add_parser("validate", help="score synthetic data against real data")
    p.add_argument("--schema", required=True)
    p.add_argument("--real", required=True, help="the real rows the generator trained on")
    p.add_argument("--holdout", required=True, help="real rows no generator saw")
    p.add_argument("--synthetic", required=True)
    p.add_argument("--synthetic-header", action=argparse.BooleanOptionalAction, default=True,
                   help="whether the synthetic CSV has a header row (fedsynth writes one)")
    p.add_argument("--out", required=True, help="folder for validation.json and report.html")
    p.add_argument("--force", action="store_true", help="replace earlier results in --out")
    p.add_argument("--target", default="", metavar="COLUMN[=V1,V2]",
                   help="the label TSTR predicts (default: the schema's outcome)")
    p.add_argument("--strict", action="store_true", help="exit 1 when the verdict fails")
    p.add_argument("--seed", type=seed_arg, default=0)

    sub.add_parser("keys", help="encryption keys of a study (see `fedsynth keys -h`)",
                   add_help=False)
    sub.add_parser("certs", help="TLS CA, coordinator certificate and SuperNode auth keys",
                   add_help=False)
    sub.add_parser("preflight", help="a site's checks before its SuperNode joins a study",
                   add_help=False)
    sub.add_parser("site-runtime", help="a site's long-lived ClientApp runtime, beside "
                   "its SuperNode (docs/deployment.md)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.markup import escape

    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(stderr=False)
    err = Console(stderr=True)
    if argv and argv[0] == "keys":
        from .common.encryption.keys import keys_command

        return keys_command(argv[1:])
    if argv and argv[0] == "certs":
        from .common.certs import certs_command

        return certs_command(argv[1:])
    if argv and argv[0] == "preflight":
        from .client.preflight import preflight_command

        return preflight_command(argv[1:])
    if argv and argv[0] == "site-runtime":
        from .client.runtime import main as site_runtime

        return site_runtime(argv[1:])
    args = build_parser().parse_args(argv)
    handlers = {
        "simulate": _run_simulate,
        "benchmark": _run_benchmark,
        "check": _run_check,
        "sample": _run_sample,
        "validate": _run_validate,
        "schema": _run_schema,
    }
    try:
        return handlers[args.command](args, console)
    except (FedsynthError, FileExistsError, json.JSONDecodeError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
