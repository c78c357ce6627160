"""Read the PEM blocks of one label out of a file (RFC 7468 textual encoding). Pure.

Certificates, chains and CRLs reach a device as PEM; this is the one place their armour is
taken off. One pass with ``bytes.find``: a regular expression with a back-reference
(``BEGIN (X)`` ... ``END \\1``) takes quadratic time on a file of many BEGIN lines, and a
device reads these files before it has checked a signature. Text outside the blocks (the
``openssl x509 -text`` dump, other labels) is skipped, as OpenSSL's reader skips it.
"""

from __future__ import annotations

import binascii

from agent.core.der import DerError


def pem_blocks(data: bytes, label: str) -> list[bytes]:
    """The DER of every block labelled ``label``, in order; ``DerError`` for a block with no
    END line, a boundary inside it, or base64 that is not strict."""
    begin, end = f"-----BEGIN {label}-----".encode(), f"-----END {label}-----".encode()
    out: list[bytes] = []
    pos = data.find(begin)
    while pos >= 0:
        body = pos + len(begin)
        stop = data.find(end, body)
        if stop < 0:
            raise DerError(f"{label} block {len(out)}: no END line")
        text = data[body:stop]
        if b"-----" in text:  # another boundary inside the block: not one block
            raise DerError(f"{label} block {len(out)}: a boundary line inside the block")
        try:
            out.append(binascii.a2b_base64(b"".join(text.split()), strict_mode=True))
        except binascii.Error as exc:
            raise DerError(f"{label} block {len(out)}: bad base64 ({exc})") from None
        pos = data.find(begin, stop + len(end))
    return out


__all__ = ["pem_blocks"]
