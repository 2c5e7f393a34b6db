"""Pseudonymous ids: keyed, stable, well-formed, and refusing an empty key."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest

from tasks.pseudonym import pseudonymous_id, pseudonymous_study_id


def test_format_and_stability() -> None:
    first = pseudonymous_id("ProstateX-0000", "secret")
    assert re.fullmatch(r"P[0-9a-f]{12}", first)
    assert pseudonymous_id("ProstateX-0000", "secret") == first
    assert pseudonymous_id("ProstateX-0000", b"secret") == first  # str key is UTF-8
    assert pseudonymous_id("  ProstateX-0000 ", "secret") == first  # surrounding space ignored


def test_construction_is_hmac_sha256() -> None:
    # Pins the construction, so a refactor cannot silently rename every patient.
    digest = hmac.new(b"k", b"patient\x00A", hashlib.sha256).hexdigest()
    assert pseudonymous_id("A", "k") == "P" + digest[:12]


def test_key_and_identifier_matter() -> None:
    base = pseudonymous_id("ProstateX-0000", "secret")
    assert pseudonymous_id("ProstateX-0000", "other") != base
    assert pseudonymous_id("ProstateX-0001", "secret") != base


def test_study_ids_are_separate() -> None:
    study = pseudonymous_study_id("ProstateX-0000", "secret")
    assert re.fullmatch(r"S[0-9a-f]{12}", study)
    assert study[1:] != pseudonymous_id("ProstateX-0000", "secret")[1:]


@pytest.mark.parametrize("key", ["", b""])
def test_empty_key_is_an_error(key: str | bytes) -> None:
    with pytest.raises(ValueError, match="key is empty"):
        pseudonymous_id("ProstateX-0000", key)
    with pytest.raises(ValueError, match="key is empty"):
        pseudonymous_study_id("1.2.3", key)


def test_empty_identifier_is_an_error() -> None:
    with pytest.raises(ValueError, match="identifier is empty"):
        pseudonymous_id("  ", "secret")
