"""Pseudonymous identifiers: keyed HMAC-SHA256 of the original identifiers.

The same original identifier and key always give the same pseudonym, so reruns and new exams
of a known patient land in the same place; without the key the mapping cannot be recomputed
or reversed (unlike a plain hash of a guessable identifier such as "ProstateX-0000").
Keep the key out of the repository and out of logs; rotating it renames every patient.

The identifier is the prefix followed by the first 12 hex digits (48 bits) of the HMAC:
collisions become likely only around 2**24 (16 million) identifiers per key.
"""

from __future__ import annotations

import hashlib
import hmac

_DIGITS = 12


def _pseudonym(kind: str, original: str, key: bytes | str, prefix: str) -> str:
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not key:
        raise ValueError("pseudonymisation key is empty: set a secret key")
    if not isinstance(original, str) or not original.strip():
        raise ValueError(f"original {kind} identifier is empty")
    # The kind is part of the message, so a patient and a study with equal original
    # identifiers still get unrelated pseudonyms.
    message = f"{kind}\x00{original.strip()}".encode()
    return prefix + hmac.new(key, message, hashlib.sha256).hexdigest()[:_DIGITS]


def pseudonymous_id(original_patient_id: str, key: bytes | str) -> str:
    """Return the pseudonymous patient id, ``'P'`` + 12 lowercase hex digits.

    Parameters
    ----------
    original_patient_id
        The identifier to hide (leading/trailing white space is ignored).
    key
        The secret HMAC key (text is UTF-8 encoded). Must not be empty.

    Raises
    ------
    ValueError
        Empty key or empty identifier.
    """
    return _pseudonym("patient", original_patient_id, key, "P")


def pseudonymous_study_id(original_study_id: str, key: bytes | str) -> str:
    """Return the pseudonymous study id, ``'S'`` + 12 lowercase hex digits (see above)."""
    return _pseudonym("study", original_study_id, key, "S")
