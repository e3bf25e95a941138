"""A site's side of encrypted aggregation: open the global model, seal the update.

With ``secure-aggregation = "ckks"`` a round at a site is:

1. open the study's secret CKKS context from the site's own key files (node config
   ``key-dir``, ``holder-public-key``, ``wrapped-context``), in memory only;
2. compute the model's slot layout from public inputs (schema, generator, count bound)
   and refuse a coordinator whose layout differs, rather than trusting its word;
3. decrypt the summed ciphertexts the coordinator relays into the weighted mean (round
   1, or a round after no site trained, starts from the public initial model in clear:
   it was made from the schema alone and holds no data);
4. train with ``site.train_site`` exactly as without encryption (DP, ledger, FedProx's
   anchor being the decrypted global model);
5. encrypt ``(n / B) * weights`` and ``n / B`` (``n`` the DP row count) and send only
   the ciphertexts.

What the reply says in clear, and why each is allowed:

- ``num-examples`` is the public constant :data:`ENCRYPTED_WEIGHT`: Flower's strategies
  expect the key, but the coordinator weights nothing with it; the weights are inside
  the ciphertexts, where the coordinator can add them without reading them;
- epsilon and delta: they depend only on the public plan (noise, rate, steps), not on
  the number of rows;
- the DP loss report and the step count (``epochs / sample rate``, public);
- not ``train-seconds``: a DP-SGD round's wall time grows with the Poisson batches of
  ``q * n`` rows, so it would disclose roughly the count the ciphertexts hide.

At the end of the study, one site is asked (a Flower QUERY, not a training round: no
row is read and no privacy is spent) to decrypt the final aggregate and hand it over
for release, after :func:`~fedsynth.common.encryption.flood_for_release`: the exact
decryption next to the ciphertexts the coordinator holds would give away the key.

This module is free of Flower; ``client/app.py`` moves its inputs and outputs in and
out of the messages.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from ..common.encryption import (
    EncryptedUpdateError,
    EncryptionContextError,
    KeySetupError,
    StateLayout,
    check_ciphertexts,
    decrypt_state,
    decrypt_weighted_mean,
    encrypt_state,
    encrypt_weighted_update,
    flood_for_release,
    unwrap_secret_context,
)
from ..common.generators import get_generator
from ..common.protocol import (
    CKKS,
    ENCRYPTED_WEIGHT,
    NUM_EXAMPLES,
    VALUES,
    Status,
)
from ..common.schema import Schema
from ..common.study import SiteConfig, StudyConfig
from .site import (
    TRAINED,
    SiteReply,
    SiteState,
    released_model_path,
    site_schema,
    status_metrics,
    train_site,
)

log = logging.getLogger("fedsynth.site")

# Names on the wire live in common/protocol.py; these are their old names here.
CKKS_RECORD = CKKS
NO_KEYS = Status.NO_KEYS
AGGREGATE_REFUSED = Status.AGGREGATE_REFUSED
ENCRYPTION_FAILED = Status.ENCRYPTION_FAILED
RELEASED = Status.RELEASED

_CONTEXTS: dict[tuple[object, ...], ts.Context] = {}


@dataclass
class SecureReply:
    """A site's reply in an encrypted study: status and public metrics, plus ciphertexts."""

    reply: SiteReply
    ciphertexts: list[bytes] | None = None
    layout_json: str = ""


@dataclass(frozen=True)
class GlobalModel:
    """What the coordinator sent as the round's starting point (from one message)."""

    aggregate: Sequence[bytes] | None = None
    layout_json: str | None = None
    initial: Mapping[str, np.ndarray] | None = None


def site_context(site: SiteConfig, study_id: str) -> ts.Context:
    """The study's secret context, unwrapped from the site's key files (cached per process).

    Cached because every round needs it and unwrapping runs the key agreement and
    parses the context; the cache key includes the files' modification times, so
    replaced key files are read again.
    """
    named = {
        "key-dir": site.key_dir,
        "holder-public-key": site.holder_public_key,
        "wrapped-context": site.wrapped_context,
    }
    missing = [key for key, value in named.items() if not value]
    if missing:
        raise KeySetupError(
            f"the study encrypts its aggregation, but site {site.name}'s node config lacks "
            f"{', '.join(missing)}; run `fedsynth keys site-init`, get the wrapped context "
            "and the key holder's public key for this study, and name them in the node config"
        )
    paths = tuple(named.values())
    key = (study_id, *paths, *(_mtime(p) for p in paths))
    if key not in _CONTEXTS:
        ctx = unwrap_secret_context(study_id, *paths)
        _CONTEXTS.clear()  # one study per site process at a time; drop stale keys
        _CONTEXTS[key] = ctx
    return _CONTEXTS[key]


def encrypt_counts(site: SiteConfig, study: StudyConfig, values: np.ndarray
                   ) -> tuple[list[bytes], str]:
    """A noisy count vector (a marginal study's release, a deep study's quantile grid)
    encrypted under the study's CKKS key, scaled by 1 / count-bound to keep CKKS's
    values small; its ciphertexts and layout. Raises ``KeySetupError`` /
    ``EncryptionContextError`` when the site's keys do not open the context."""
    ctx = site_context(site, study.study_id)
    layout = StateLayout.from_state({VALUES: values})
    update = encrypt_state(ctx, {VALUES: values}, 1.0 / study.count_bound, layout=layout)
    return list(update.chunks), layout.to_json()


def decrypt_counts(site: SiteConfig, study: StudyConfig, chunks: Sequence[bytes],
                   layout_json: str) -> np.ndarray:
    """A sum of encrypted count vectors, decrypted and flooded, as the final release of
    an encrypted training study: the exact decryption next to the ciphertexts the
    coordinator holds would give away the key. DP post-processing: nothing is charged.
    Raises on keys that do not open, or ciphertexts that are not the layout's."""
    ctx = site_context(site, study.study_id)
    summed = decrypt_state(ctx, list(chunks), StateLayout.from_json(layout_json))
    return flood_for_release({VALUES: summed[VALUES] * study.count_bound},
                             floor=study.count_bound)[VALUES]


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


def model_layout(schema: Schema, study: StudyConfig) -> StateLayout:
    """The study model's slot layout, from public inputs only (no data, no coordinator).

    A site computes it itself so that a coordinator cannot make it decrypt into, or
    encrypt from, a model other than the one the published plan describes.
    """
    model = get_generator(study.generator)(schema, seed=study.seed, **study.generator_params)
    return StateLayout.from_state(model.state_dict(), count_bound=study.count_bound)


def open_global_model(
    ctx: ts.Context, received: GlobalModel, layout: StateLayout
) -> dict[str, np.ndarray]:
    """The round's starting weights: the decrypted weighted mean, or the initial model.

    Raises :class:`EncryptedUpdateError` (or ``ValueError``) for anything the site must
    not train from: a layout that is not the study model's, an aggregate that does not
    decrypt, holds the wrong number or size of ciphertexts, or decodes out of range.
    """
    if received.layout_json is not None:
        try:
            theirs = StateLayout.from_json(received.layout_json)
        except ValueError as exc:
            raise EncryptedUpdateError(
                f"the coordinator's model layout is unreadable: {exc}"
            ) from None
        if theirs != layout:
            raise EncryptedUpdateError(
                "the coordinator's model layout differs from the model this site builds from "
                f"the published plan ({theirs.n_params} values vs {layout.n_params}, "
                f"count bound {theirs.count_bound} vs {layout.count_bound})"
            )
    if received.aggregate is not None:
        chunks = list(received.aggregate)
        check_ciphertexts(ctx, chunks, layout)  # count, sizes, structure: safe to report
        try:
            mean, _total = decrypt_weighted_mean(ctx, chunks, layout)
        except EncryptedUpdateError as exc:
            # Past this point a reason may quote a decrypted value (the count slot), and
            # the reply goes to the coordinator, who chose the ciphertext: a decryption
            # oracle. The detail stays in the site's log; the reply gets a fixed text.
            log.warning("the aggregate did not decrypt to a valid sum: %s", exc)
            raise EncryptedUpdateError(
                "the aggregate does not decrypt to a sum of this study's updates (another "
                "key, too many summands, or altered ciphertexts)"
            ) from None
        return mean  # the total row count stays here: only sites may know it
    if received.initial is None:
        raise EncryptedUpdateError("the message holds neither an aggregate nor an initial model")
    initial = {k: np.asarray(v) for k, v in received.initial.items()}
    layout.flatten(initial)  # raises ValueError on a missing key, a wrong shape, NaN
    return initial


def train_encrypted(
    site: SiteConfig,
    study: StudyConfig,
    schema_fp: str,
    received: GlobalModel,
    state: SiteState,
    server_round: int,
    commit: Callable[[SiteState], None] | None = None,
) -> SecureReply:
    """One encrypted round at a site; ``state`` changes only when ``train_site`` spends
    (``commit`` saves the round's cost first, as ``train_site`` says)."""
    schema = site_schema(site, state, schema_fp)
    if isinstance(schema, SiteReply):
        return SecureReply(schema)
    try:
        ctx = site_context(site, study.study_id)
    except (KeySetupError, EncryptionContextError) as exc:
        log.warning("site %s: %s", site.name, exc)
        return SecureReply(SiteReply(NO_KEYS, status_metrics(site, state), problems=[str(exc)]))
    layout = model_layout(schema, study)
    try:
        start = open_global_model(ctx, received, layout)
    except (EncryptedUpdateError, ValueError) as exc:
        log.warning("site %s, round %d: refused the global model: %s", site.name, server_round,
                    exc)
        return SecureReply(
            SiteReply(
                AGGREGATE_REFUSED,
                status_metrics(site, state),
                problems=[f"refused the global model the coordinator sent: {exc}"],
            )
        )
    reply = train_site(site, study, schema_fp, start, state, server_round, commit)
    if reply.status != TRAINED or reply.arrays is None:
        return SecureReply(reply)
    try:
        update = encrypt_weighted_update(
            ctx, reply.arrays, reply.metrics[NUM_EXAMPLES], layout=layout
        )
    except ValueError as exc:
        # The detail names a weight's magnitude: it stays in the site's log.
        log.warning("site %s, round %d: cannot encrypt the update: %s", site.name,
                    server_round, exc)
        return SecureReply(
            SiteReply(
                ENCRYPTION_FAILED,
                status_metrics(site, state),
                problems=[
                    "the update does not fit the encryption's value range (training "
                    "diverged, or count-bound is below this site's row count); details are "
                    "in the site's log"
                ],
            )
        )
    public = {k: v for k, v in reply.metrics.items() if k != NUM_EXAMPLES}
    public[NUM_EXAMPLES] = ENCRYPTED_WEIGHT
    return SecureReply(
        SiteReply(TRAINED, public, problems=reply.problems), update.chunks, layout.to_json()
    )


def release_final(
    site: SiteConfig,
    study: StudyConfig,
    schema_fp: str,
    received: GlobalModel,
    state: SiteState,
) -> SiteReply:
    """Decrypt the final aggregate and return it, flooded, for release; no training.

    The model is DP post-processing of every site's training, so releasing it costs no
    privacy; the ledger is read for the reply's epsilon, never charged. Flooding is not
    optional: the exact decryption next to the ciphertexts would let the coordinator
    solve for the key (Li-Micciancio 2021), and with it read every past update.
    """
    schema = site_schema(site, state, schema_fp)
    if isinstance(schema, SiteReply):
        return schema
    try:
        ctx = site_context(site, study.study_id)
    except (KeySetupError, EncryptionContextError) as exc:
        return SiteReply(NO_KEYS, status_metrics(site, state), problems=[str(exc)])
    if received.aggregate is None:
        return SiteReply(
            AGGREGATE_REFUSED,
            status_metrics(site, state),
            problems=["the release request holds no aggregate to decrypt"],
        )
    try:
        mean = open_global_model(ctx, received, model_layout(schema, study))
    except (EncryptedUpdateError, ValueError) as exc:
        log.warning("site %s: refused to release the final aggregate: %s", site.name, exc)
        return SiteReply(
            AGGREGATE_REFUSED,
            status_metrics(site, state),
            problems=[f"refused to release the final aggregate: {exc}"],
        )
    kept = released_model_path(site, study.study_id)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(kept, "wb") as fh:
            np.savez(fh, **mean)
    return SiteReply(RELEASED, status_metrics(site, state), arrays=flood_for_release(mean))

