"""What the code histogram alone gives AMLSG's gene-frequency correlation, by its share.

No model: the seed's training rows' bounded histogram (`codes.bounded_histogram`, each
patient keeps at most b genes), plus Gaussian noise of the summed std of 18 sites at
epsilon 3 (18.6 per gene at b = 3 and codes_share 0.35, the std scaling as
sqrt(b / 3) * sqrt(0.35 / share)), clipped at 0 (a model's counts are not negative),
correlated
(Pearson, as `code_frequency_correlation`) with the holdout's frequencies; the median of
200 noise draws (numpy's default_rng(0): a benchmark, not a release), at b = 3 with the
10th-90th percentiles of one draw (what one seed's single study can land on); "sampled":
the same, then each gene's count drawn Binomial(n, frequency), as independent rows drawn
from a model with those frequencies (``synthetic_data(method="sample")``) would give.
It is what a model that read the histogram alone would reach: a ceiling for the shares'
search (results.md "Fifth pass: shares").

Usage: python shares_ceiling.py   (output: shares_ceiling.txt)
"""

from pathlib import Path

import numpy as np
from scipy import stats

from fedsynth.common.generators.marginal.codes import bounded_histogram
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

SHARES = (0.35, 0.42, 0.5, 0.6)
for seed in (0, 1, 2):
    d = prepare_seed(BenchmarkOptions(dataset="amlsg"), seed,
                     Path(f"/tmp/marginal-datasets/amlsg{seed}"))
    cols = list(d.schema.codesets.values())[0]
    train = d.train[cols].to_numpy(float).clip(0, 1).astype(int)
    real = d.holdout[cols].to_numpy(float).clip(0, 1).mean(0)
    n, rng = len(train), np.random.default_rng(0)
    row = [f"seed {seed}: train rows {stats.pearsonr(real, train.mean(0))[0]:.3f}"]
    for b in (2, 3, 4, 6):
        h = bounded_histogram(train, b, rng).astype(float)
        noisy = []
        for share in SHARES:
            sd = 18.6 * np.sqrt(b / 3) * np.sqrt(0.35 / share)
            draws = [stats.pearsonr(real, (h + rng.normal(0, sd, h.size)).clip(0))[0]
                     for _ in range(200)]
            noisy.append(f"{np.median(draws):.3f}" + (
                f" [{np.percentile(draws, 10):.3f}-{np.percentile(draws, 90):.3f}]"
                if b == 3 else ""))
        if b == 3:  # and then n rows drawn from those frequencies, as the model samples
            sampled = [np.median([stats.pearsonr(real, rng.binomial(n, np.clip(
                (h + rng.normal(0, 18.6 * np.sqrt(0.35 / share), h.size)) / n, 0, 1)))[0]
                for _ in range(200)]) for share in SHARES]
            row.append("b 3 sampled: " + " / ".join(
                f"{s} {v:.3f}" for s, v in zip(SHARES, sampled, strict=True)))
        row.append(f"b {b}: no noise {stats.pearsonr(real, h)[0]:.3f}, share "
                   + " / ".join(f"{s} {v}" for s, v in zip(SHARES, noisy, strict=True)))
    print(" | ".join(row), flush=True)
