"""Encrypted aggregation: the coordinator adds hospitals' updates it cannot read.

Two parts, usable separately:

- :mod:`.ckks` packs a flat state dict into CKKS ciphertexts (TenSEAL), sums them with
  a key-less context at the coordinator, and decrypts the weighted mean at the sites
  without the coordinator ever learning a site's row count.
- :mod:`.keys` sets a study up: X25519 key pairs per site, one secret CKKS context
  wrapped (X25519 + HKDF-SHA256 + AES-256-GCM) for each site, a public context for the
  coordinator, all written atomically with owner-only permissions; plus the
  ``fedsynth keys`` command.

Known limit (one shared key): a site that colludes with the coordinator can read the
other sites' updates. Differential privacy still protects the patients in that case.
"""

from __future__ import annotations

from .ckks import (
    COEFF_MOD_BIT_SIZES,
    DEFAULT_COUNT_BOUND,
    GLOBAL_SCALE,
    MAX_ABS_VALUE,
    MAX_SUMMANDS,
    POLY_MODULUS_DEGREE,
    SCALE_BITS,
    SLOTS_PER_CIPHERTEXT,
    EncryptedUpdate,
    EncryptedUpdateError,
    EncryptionContextError,
    StateLayout,
    add_encrypted,
    check_ciphertexts,
    ciphertext_nbytes,
    decrypt_state,
    decrypt_weighted_mean,
    encrypt_state,
    encrypt_weighted_update,
    flood_for_release,
    load_context,
    make_secret_context,
    public_context_bytes,
    secret_context_bytes,
)
from .keys import (
    KeySetupError,
    SiteKeyPair,
    StudyKeys,
    create_study_keys,
    generate_site_keypair,
    keys_command,
    load_public_context,
    public_key_fingerprint,
    unwrap_secret_context,
)

__all__ = [
    "COEFF_MOD_BIT_SIZES",
    "DEFAULT_COUNT_BOUND",
    "GLOBAL_SCALE",
    "MAX_ABS_VALUE",
    "MAX_SUMMANDS",
    "POLY_MODULUS_DEGREE",
    "SCALE_BITS",
    "SLOTS_PER_CIPHERTEXT",
    "EncryptedUpdate",
    "EncryptedUpdateError",
    "EncryptionContextError",
    "KeySetupError",
    "SiteKeyPair",
    "StateLayout",
    "StudyKeys",
    "add_encrypted",
    "check_ciphertexts",
    "ciphertext_nbytes",
    "create_study_keys",
    "decrypt_state",
    "decrypt_weighted_mean",
    "encrypt_state",
    "encrypt_weighted_update",
    "flood_for_release",
    "generate_site_keypair",
    "keys_command",
    "load_context",
    "load_public_context",
    "make_secret_context",
    "public_context_bytes",
    "public_key_fingerprint",
    "secret_context_bytes",
    "unwrap_secret_context",
]
