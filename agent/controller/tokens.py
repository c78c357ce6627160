"""Tokens at rest: the database keeps only SHA-256 digests; a token is shown once, when it is made.

Device TargetTokens and the operator's bearer token are high-entropy random strings (or an
operator's own choice), so one SHA-256 is enough: there is nothing to brute-force that a
slow hash would protect. Whoever reads a stolen ``controller.db`` learns no token that this
controller accepts. The generated operator token is written once, to ``operator.token``
(0600) beside the artifacts, and never to the log.
"""

from __future__ import annotations

import hashlib
import secrets

OPERATOR_KEY = "api_token_sha256"  # kv row with the operator token's digest


def new_token() -> str:
    return secrets.token_urlsafe(24)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def matches(token: str, stored_digest: str) -> bool:
    """``token`` is the one whose digest is stored (constant time; an empty one never matches)."""
    return bool(token) and bool(stored_digest) and secrets.compare_digest(
        digest(token).encode(), stored_digest.encode())
