"""Message kinds and record keys that the coordinator and the sites both read.

Both sides import from here and never from each other, so a key is spelled once.
(Today this holds the marginal generator's message; the other protocol keys are to
move here.)

Marginal measurement (``MARGINAL_MESSAGE``, a Flower ``query`` with its own action)
---------------------------------------------------------------------------------
A measured study's one message kind. The coordinator's content:

- ``"config"`` ConfigRecord: the study's run config (``StudyConfig.to_flat``), the
  ``schema-fingerprint``, and the keys below;
- for ``score``: the ``MODEL_RECORD`` ArrayRecord, the model's normalised marginal of
  each candidate under ``p.<i>`` (public: post-processing of earlier releases);
- for ``decrypt``: the ``CKKS_COUNTS`` ConfigRecord with the summed ciphertexts.

The site's reply: ``"site"`` (name, status, problems) and ``"metrics"`` (epsilon
spent, budget, the noise levels it uses) as in every reply, plus the noisy vector in
clear (``COUNTS_RECORD``, ArrayRecord ``values``) or encrypted (``CKKS_COUNTS``).
"""

from __future__ import annotations

MARGINAL_ACTION = "marginal"
MARGINAL_MESSAGE = f"query.{MARGINAL_ACTION}"

# config keys of a marginal message
OP = "marginal-op"  # MEASURE_OP | SCORE_OP | DECRYPT_OP
RELEASE_KIND = "marginal-kind"  # plan.ONE_WAY | plan.MEASURE (what the site charges)
CLIQUES = "marginal-cliques"  # JSON list of attribute-name lists
PLAN = "marginal-plan"  # JSON of MarginalPlan: each site calibrates its own noise from it
STEP = "marginal-step"  # 1, 2, ...: the release's place in the study (logs, test noise)

MEASURE_OP = "measure"
SCORE_OP = "score"
DECRYPT_OP = "decrypt"

# records
MODEL_RECORD = "marginal-model"  # coordinator -> site (score): p.<i> arrays
COUNTS_RECORD = "marginal-counts"  # site -> coordinator, in clear: "values"
CKKS_COUNTS = "marginal-ckks"  # ciphertexts both ways: CHUNKS, LAYOUT
CHUNKS = "chunks"
LAYOUT = "layout"
VALUES = "values"

# reply metrics (besides epsilon, delta, epsilon-budget)
SIGMA_ONE_WAY = "sigma-one-way"
SIGMA_SCORE = "sigma-score"
SIGMA_MEASURE = "sigma-measure"
SIGMA_RELEASED = "sigma"  # the noise std of this reply's vector
