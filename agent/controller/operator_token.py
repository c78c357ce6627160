"""The operator's bearer token: its digest in the database, the token itself shown once, in a file.

``controller serve`` without ``--token`` generates the token on the first start of a new
database, keeps only its SHA-256 (kv ``api_token_sha256``) and writes the token to
``<data>/operator.token`` (0600), never to the log, which often ends up in a journal.
Later starts find the digest; the token itself exists only in that file (and wherever the
operator copied it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.adapters.fsutil import SECRET, atomic_write
from agent.controller import tokens
from agent.controller.db import Database


@dataclass(frozen=True)
class OperatorToken:
    digest: str
    said: str  # for the start line: where the token is


def load_or_create(db: Database, data: Path) -> OperatorToken:
    path = data / "operator.token"
    fresh = tokens.new_token()
    with db.tx():
        rows = db.query("SELECT v FROM kv WHERE k = ?", [tokens.OPERATOR_KEY])
        if rows:
            return OperatorToken(str(rows[0][0]), f"operator token in {path}")
        db.execute("INSERT INTO kv (k, v) VALUES (?, ?)", [tokens.OPERATOR_KEY, tokens.digest(fresh)])
    atomic_write(path, fresh + "\n", mode=SECRET)  # Fleet() has made the directory
    return OperatorToken(tokens.digest(fresh), f"operator token in {path} (new)")
