"""A CA directory on disk: ``root.key`` (0600), ``root.crt`` and ``revoked.crl``, written through fsutil.

The layout ``edgeops keys init-root`` makes and the controller's device CA reuses; the
certificates and CRLs themselves are built by ``agent.core.pki``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.adapters import fsutil
from agent.core import pki
from agent.errors import ConfigError

KEY_NAME, CERT_NAME, CRL_NAME = "root.key", "root.crt", "revoked.crl"


def create_root(out: Path, *, name: str, days: int, now: dt.datetime) -> tuple[Path, Path]:
    """Make a new Ed25519 root in ``out``: (key path, certificate path). A root is made once:
    an existing key is never overwritten."""
    out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out / KEY_NAME, out / CERT_NAME
    if key_path.exists():
        raise ConfigError(f"{key_path} exists", hint="choose an empty --out directory; a root is made once")
    key = ed25519.Ed25519PrivateKey.generate()
    cert = pki.root_certificate(key, common_name=name, now=now, days=days,
                                serial=x509.random_serial_number())
    write_private_key(key_path, key)
    fsutil.atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def write_private_key(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    """PKCS#8 PEM, unencrypted, created 0600 (offline keys: the directory is the protection)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fsutil.atomic_write(path, pem, mode=fsutil.SECRET)


def load_root(root_dir: Path) -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((root_dir / KEY_NAME).read_bytes(), None)
        cert = x509.load_pem_x509_certificate((root_dir / CERT_NAME).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the root from {root_dir}: {exc}",
                          hint="pass the directory made by 'edgeops keys init-root'") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{root_dir}/{KEY_NAME} is not an Ed25519 key")
    return key, cert


def read_crl(path: Path) -> x509.CertificateRevocationList | None:
    """The CRL at ``path``, or None when there is none yet."""
    try:
        return x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError:
        return None


def write_crl(path: Path, crl: x509.CertificateRevocationList, *, mode: int = fsutil.PUBLIC) -> None:
    fsutil.atomic_write(path, crl.public_bytes(serialization.Encoding.PEM), mode=mode)


__all__ = ["CERT_NAME", "CRL_NAME", "KEY_NAME", "create_root", "load_root", "read_crl",
           "write_crl", "write_private_key"]
