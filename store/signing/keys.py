"""``Keyring``: the secrets this process signs and verifies with (the first signs, every one
verifies), each known by a short id; HMAC-SHA256, nothing else."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

# The scheme a signature names first: "v1:<key id>:<hex>". Another scheme is a new prefix.
SCHEME = "v1"
# Shorter keys are refused: a secret a person could guess or read off a screen.
MIN_KEY_CHARS = 16
_SIGNATURE = re.compile(r"v1:([0-9a-f]{8}):([0-9a-f]{64})")


def key_id(key: str) -> str:
    """The id carried beside a signature: the first 8 hex digits of the key's SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_keys(text: str) -> tuple[str, ...]:
    """The keys of a comma- or newline-separated list, blanks and stray spaces dropped."""
    return tuple(key.strip() for key in text.replace("\n", ",").split(",") if key.strip())


class Keyring:
    """Signs with the first key, verifies with any. Holds the keys but never shows them: its
    repr, and every error it raises, name key ids only."""

    __slots__ = ("_keys", "ids", "signing_id")

    def __init__(self, keys: Iterable[str]) -> None:
        found = tuple(keys)
        if not found:
            raise ValueError("a keyring needs at least one key")
        self._keys: dict[str, bytes] = {}
        for key in found:
            self._keys.setdefault(key_id(key), key.encode())
        self.ids: tuple[str, ...] = tuple(self._keys)
        self.signing_id = self.ids[0]

    def __repr__(self) -> str:
        return f"Keyring(ids={list(self.ids)})"

    def sign(self, data: bytes) -> str:
        """``v1:<key id>:<hex HMAC-SHA256 of data>`` with the first key."""
        digest = hmac.digest(self._keys[self.signing_id], data, "sha256")
        return f"{SCHEME}:{self.signing_id}:{digest.hex()}"

    def refusal(self, data: bytes, signature: object) -> tuple[str, str] | None:
        """Why ``signature`` does not sign ``data`` under one of these keys, as (reason, detail);
        None if it does. Reasons: ``unsigned``, ``malformed_signature``, ``unknown_key``,
        ``bad_signature``."""
        if signature is None or signature == "":
            return "unsigned", "no signature"
        match = _SIGNATURE.fullmatch(signature) if isinstance(signature, str) else None
        if match is None:
            return "malformed_signature", "not v1:<8 hex key id>:<64 hex HMAC-SHA256>"
        kid, hexdigest = match.groups()
        key = self._keys.get(kid)
        if key is None:
            return "unknown_key", f"signed with key id {kid}, not one of {list(self.ids)}"
        expected = hmac.digest(key, data, "sha256").hex()
        if not hmac.compare_digest(expected, hexdigest):
            return "bad_signature", f"the signature does not match (key id {kid})"
        return None
