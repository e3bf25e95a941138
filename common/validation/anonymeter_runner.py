"""Anonymeter's privacy attacks, run in anonymeter's own environment.

Anonymeter (Giomi, Boenisch, Wehmeyer, Tasnádi, 2023, "A Unified Framework for
Quantifying Privacy Risk in Synthetic Data", PoPETs 2023(2); the tool the French data
protection authority CNIL reviewed) measures the three risks the GDPR's anonymisation
guidance names: singling out, linkability and inference. Each risk compares the attack's
success on training rows with its success on the holdout ("control"), so it already is
relative to new patients: 0 means the synthetic data helps the attacker no more against
a training patient than against anyone else.

Anonymeter pins numpy < 2 while this project uses numpy 2, so it cannot be imported
here. It runs in a separate virtual environment, by path, through
``_anonymeter_worker.py``; the tables travel as CSV files in a temporary folder. Set it
up once, outside the project's environment::

    python3 -m venv /opt/anonymeter-venv
    /opt/anonymeter-venv/bin/pip install anonymeter==1.1.0

and pass ``anonymeter_python="/opt/anonymeter-venv/bin/python"`` to ``validate``. The
test of this module runs when the environment variable ``FEDSYNTH_ANONYMETER_PYTHON``
names that interpreter. Anonymeter draws its attacks at random; the worker passes the
validation seed to the singling-out evaluator and seeds numpy's global generator (used by
the inference attack), so the risks are reproducible. Anonymeter 1.1.0 draws the
linkability *baseline* (a random guess, shown in the note) from an unseeded generator.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..errors import FedsynthError
from .context import Context
from .metric import MetricValue, metric

AREA = "privacy"
WORKER = Path(__file__).with_name("_anonymeter_worker.py")

#: Attacks per evaluator (anonymeter's examples use 500 to 2000).
N_ATTACKS = 500
#: A risk estimate above this fails (anonymeter's risks lie in [0, 1]).
RISK_THRESHOLD = 0.10
#: Seconds the separate process may take.
TIMEOUT_S = 600


class AnonymeterError(FedsynthError, RuntimeError):
    """The anonymeter process failed; the message carries its stderr."""


def run_anonymeter(
    ctx: Context, python: str, n_attacks: int = N_ATTACKS, secrets: list[str] | None = None
) -> dict[str, Any]:
    """Run the three attacks in the interpreter ``python`` and return its raw results."""
    if secrets is None:
        secrets = [ctx.target.column] if ctx.target is not None else []
    with tempfile.TemporaryDirectory(prefix="fedsynth-anonymeter-") as tmp:
        folder = Path(tmp)
        job: dict[str, Any] = {
            "n_attacks": n_attacks,
            "secrets": secrets,
            "categorical": ctx.categorical_columns,
            "seed": ctx.seed,
        }
        for key, name in (("train", "train"), ("synthetic", "synthetic"), ("control", "holdout")):
            path = folder / f"{key}.csv"
            ctx.table(name).frame(ctx.schema).to_csv(path, index=False)
            job[key] = str(path)
        job_path = folder / "job.json"
        job_path.write_text(json.dumps(job), encoding="utf-8")
        try:
            proc = subprocess.run(
                [python, str(WORKER), str(job_path)],
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AnonymeterError(f"could not run anonymeter with {python}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise AnonymeterError(f"anonymeter failed with exit code {proc.returncode}:\n{tail}")
    return json.loads(proc.stdout)


def _metric(
    name: str, meaning: str, res: dict[str, Any], columns: list[str] | None = None
) -> MetricValue:
    return metric(
        name,
        AREA,
        res["risk"],
        "lower",
        meaning,
        columns=columns,
        reference=0.0,
        threshold=RISK_THRESHOLD,
        note=f"95% CI [{res['ci'][0]:.3f}, {res['ci'][1]:.3f}]; attack {res['attack_rate']:.3f}"
        f", baseline {res['baseline_rate']:.3f}, control {res['control_rate']:.3f}",
        details=res,
    )


def anonymeter_metrics(ctx: Context, python: str, n_attacks: int = N_ATTACKS) -> list[MetricValue]:
    """Anonymeter's risks as metrics: reference 0 (its risk is already net of the
    holdout's), the confidence interval and the baseline attack's rate in the note."""
    raw = run_anonymeter(ctx, python, n_attacks)
    out = [
        _metric(
            "anonymeter_singling_out_risk",
            "anonymeter singling-out risk: predicates that isolate one training patient",
            raw["singling_out"],
        ),
        _metric(
            "anonymeter_linkability_risk",
            "anonymeter linkability risk: joining two halves of a patient's columns",
            raw["linkability"],
        ),
    ]
    for secret, res in raw["inference"].items():
        out.append(
            _metric(
                "anonymeter_inference_risk",
                f"anonymeter inference risk: guessing {secret} from the other columns",
                res,
                columns=[secret],
            )
        )
    return out
