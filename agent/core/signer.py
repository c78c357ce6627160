"""What a trial remembers of the certificates that signed it, and whether they still hold. Pure.

A bundle is judged once, at install (``agent.core.trust.verify_head``); its trial may commit
minutes or days later. In between a CRL can arrive (the operator's crl_dir, a model bundle's
CRL) or the signer can expire at the best-known time. ``record_of`` keeps what that second
look needs — each certificate of the path by issuer and serial, and the earliest expiry —
and ``distrust`` says why the trial must not commit, or None. The updater asks it before a
trial commits (``lifecycle.SignerDistrusted``).
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from agent.core import trust
from agent.core.frozen import Frozen


class SignerRecord(Frozen):
    subject: str  # the signer's subject, for the reason a person reads
    path: tuple[tuple[str, int], ...]  # (issuer, serial) of each certificate below the root
    not_after: int  # the earliest expiry of any certificate of the path, root included

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "path": [list(p) for p in self.path],
                "not_after": self.not_after}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SignerRecord:
        return cls(str(d["subject"]), tuple((str(i), int(s)) for i, s in d["path"]),
                   int(d["not_after"]))


def record_of(chain_pem: bytes, keyring: trust.Keyring) -> SignerRecord:
    """The record of a chain ``verify_head`` accepted (raises as it does for any other)."""
    path = trust.build_path(trust.parse_chain(chain_pem), keyring)
    ids = tuple((issuer.subject.text, cert.serial_number)
                for cert, issuer in itertools.pairwise(path))
    return SignerRecord(path[0].subject.text, ids, min(c.not_after for c in path))


def distrust(rec: SignerRecord, *, crls: Iterable[bytes], keyring: trust.Keyring,
             best_known_time: int) -> str | None:
    """Why a trial signed under ``rec`` must not commit now, in one line, or None."""
    revoked, _ = trust.revoked_serials(crls, keyring.roots)
    for issuer, serial in rec.path:
        if (issuer, serial) in revoked:
            return f"its signer '{rec.subject}' was revoked (serial {serial:x} by '{issuer}')"
    if rec.not_after < best_known_time:
        when = dt.datetime.fromtimestamp(rec.not_after, dt.UTC).strftime("%Y-%m-%d")
        return f"its signer '{rec.subject}' expired on {when}, before the trial committed"
    return None


__all__ = ["SignerRecord", "distrust", "record_of"]
