"""The dashboard's sessions and CSRF tokens: HMAC-signed values that never carry the operator token.

An operator logs in with the operator token (``POST /login``); the controller answers with a
cookie ``edgeops_session = <expiry>.<nonce>.<mac>``, where ``mac`` is HMAC-SHA256 over
``expiry.nonce`` under a key derived from two things (``session_key``):

* a random secret kept in ``<data>/dashboard.key`` (0600), made on first use, so whoever reads
  only the database (which holds the operator token's digest) cannot mint a session, and
  several controller processes sharing the data directory accept each other's sessions;
* the operator token's digest, so replacing the operator token (``--token``) ends every session.

The cookie is ``HttpOnly; SameSite=Strict; Path=/`` (``Secure`` over HTTPS) and expires after
``SESSION_LIFETIME``; the expiry is inside the signed value, so a client cannot extend it.
Every POST form carries a CSRF token: HMAC over ``csrf.<nonce>`` of the session, compared in
constant time (the OWASP "signed double-submit" pattern, with SameSite=Strict on top:
https://cheatsheetseries.owasp.org/cheatsheets/Cross-Site_Request_Forgery_Prevention_Cheat_Sheet.html).
Neither the token nor the cookie's value is ever logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

COOKIE = "edgeops_session"
SESSION_LIFETIME = 8 * 3600  # seconds
KEY_FILE = "dashboard.key"
MAX_COOKIE = 200  # characters: anything longer is not one of ours


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: int


def session_key(data_dir: Path, token_digest: str) -> bytes:
    """The signing key: HMAC(secret in ``<data>/dashboard.key``, operator token digest)."""
    path = data_dir / KEY_FILE
    with contextlib.suppress(FileExistsError):  # O_EXCL: of processes starting at once, one writes
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
    secret = path.read_text().strip()
    if len(secret) < 32:  # a process that lost the race may read before the winner wrote
        secret = _wait_for_secret(path)
    return hmac.new(bytes.fromhex(secret), token_digest.encode(), hashlib.sha256).digest()


def _wait_for_secret(path: Path) -> str:
    for _ in range(50):
        time.sleep(0.01)
        secret = path.read_text().strip()
        if len(secret) >= 32:
            return secret
    raise OSError(f"{path} holds no key: remove it and restart the controller")


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def issue(key: bytes, now: float) -> str:
    """A new session cookie value."""
    body = f"{int(now) + SESSION_LIFETIME}.{secrets.token_hex(16)}"
    return f"{body}.{_mac(key, body)}"


def check(key: bytes, value: str | None, now: float) -> Session | None:
    """The session a cookie value names, or None: absent, malformed, forged or expired."""
    if not value or len(value) > MAX_COOKIE or not value.isascii():
        return None
    expires, _, rest = value.partition(".")
    nonce, _, mac = rest.partition(".")
    if not (expires.isdigit() and len(expires) <= 12 and nonce and mac):
        return None
    if not hmac.compare_digest(mac, _mac(key, f"{expires}.{nonce}")):
        return None
    if int(expires) <= now:
        return None
    return Session(nonce, int(expires))


def csrf_token(key: bytes, session: Session) -> str:
    return _mac(key, f"csrf.{session.nonce}")


def csrf_ok(key: bytes, session: Session, sent: str | None) -> bool:
    return sent is not None and sent.isascii() and hmac.compare_digest(sent, csrf_token(key, session))
