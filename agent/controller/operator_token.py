"""The operator's bearer token: its digest in the database, the token itself shown once, in a file.

``controller serve`` without ``--token`` needs an operator token the database knows. On the
first start of a new database it generates one, keeps only its SHA-256 (kv
``api_token_sha256``) and writes the token to ``<data>/operator.token`` (0600), never to the
log, which often ends up in a journal. That file is never overwritten: if it is already there
when a database is new (the old database was lost or moved aside), the token in it is adopted,
so the operator's scripts keep working; a file that holds no token stops the start instead.
Later starts find the digest and say whether the file still matches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.adapters.fsutil import SECRET, atomic_write
from agent.controller import tokens
from agent.controller.db import Database
from agent.errors import ConfigError


@dataclass(frozen=True)
class OperatorToken:
    digest: str
    said: str  # for the start line: where the token is


def load_or_create(db: Database, data: Path) -> OperatorToken:
    path = data / "operator.token"
    existing = _read(path)
    with db.tx():
        rows = db.query("SELECT v FROM kv WHERE k = ?", [tokens.OPERATOR_KEY])
        if rows:
            digest = str(rows[0][0])
            if existing is None:
                return OperatorToken(digest, f"operator token: {path} is missing (the database "
                                             "keeps only its digest; use --token to replace it)")
            if not tokens.matches(existing, digest):
                return OperatorToken(digest, f"operator token: {path} does NOT match the database "
                                             "(it is not the token this controller accepts)")
            return OperatorToken(digest, f"operator token in {path}")
        if existing is not None:  # a new database beside an old token file: keep the file's token
            db.execute("INSERT INTO kv (k, v) VALUES (?, ?)", [tokens.OPERATOR_KEY, tokens.digest(existing)])
            return OperatorToken(tokens.digest(existing), f"operator token in {path} (kept for "
                                                          "the new database)")
        fresh = tokens.new_token()
        db.execute("INSERT INTO kv (k, v) VALUES (?, ?)", [tokens.OPERATOR_KEY, tokens.digest(fresh)])
    # Written after the digest committed, created only where no file is (checked above, and
    # the data directory is this user's alone: umask 077).
    atomic_write(path, fresh + "\n", mode=SECRET)
    return OperatorToken(tokens.digest(fresh), f"operator token in {path} (new)")


def _read(path: Path) -> str | None:
    """The token in ``path``; None when there is no file; ConfigError for one that holds none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}",
                          hint="fix or remove it (a new token is generated only where none is)") from None
    token = text.strip()
    if not token or len(token.split()) != 1:
        raise ConfigError(f"{path} holds no operator token",
                          hint="restore it, remove it to have a new token generated, or pass --token")
    return token
