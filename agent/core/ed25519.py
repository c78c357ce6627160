"""Verify an Ed25519 signature (RFC 8032) with the libcrypto this process already holds. Pure.

``hashlib`` is OpenSSL's on every Python a device runs (``_hashlib`` links libcrypto), so
the library that checks a bundle's signatures is mapped before the install reads a byte.
Calling its ``EVP_DigestVerify`` through ``ctypes`` costs the install nothing it has not
loaded; ``cryptography`` would map its own Rust module and OpenSSL copy (~9 MiB resident,
~30 ms to import with ``x509``, docs/performance.md section 7) to run the same algorithm.
Where no libcrypto with Ed25519 can be found (OpenSSL < 1.1.1, a Python built without it, a
FIPS build that refuses RFC 8032's first test vector) ``cryptography`` is the fallback;
tests check the two agree on every input they generate.

The binding is the five calls of OpenSSL's documented one-shot verify (EVP_DigestVerify(3):
"EVP_DigestVerifyInit() ... with a NULL digest for Ed25519"), every pointer typed so ctypes
never narrows it to an int, each object freed on every path.
"""

from __future__ import annotations

import ctypes
import threading

_NID_ED25519 = 1087  # EVP_PKEY_ED25519 (obj_mac.h), the same in OpenSSL 1.1.1 and 3.x
_SONAMES = ("libcrypto.so.3", "libcrypto.so.1.1")  # what _hashlib links on Debian 12 / 11

# RFC 8032 §7.1, TEST 1 (the empty message): a libcrypto that cannot verify it (a FIPS
# build without Ed25519, a broken one) would refuse every bundle, so it is not used.
_PROBE_KEY = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
_PROBE_SIG = bytes.fromhex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
                           "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")

_lock = threading.Lock()
_loaded = False
_lib: ctypes.CDLL | None = None


def verify(public_key: bytes | bytearray | memoryview, signature: bytes | bytearray | memoryview,
           message: bytes | bytearray | memoryview) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    public_key, signature, message = bytes(public_key), bytes(signature), bytes(message)
    if len(public_key) != 32 or len(signature) != 64:
        return False
    lib = _libcrypto()
    if lib is None:
        return verify_with_cryptography(public_key, signature, message)
    return _verify_openssl(lib, public_key, signature, message)


def backend() -> str:
    """Which implementation ``verify`` uses here: 'libcrypto' or 'cryptography'."""
    return "cryptography" if _libcrypto() is None else "libcrypto"


def _libcrypto() -> ctypes.CDLL | None:
    global _loaded, _lib
    if not _loaded:
        with _lock:
            if not _loaded:
                _lib = _bind()
                _loaded = True
    return _lib


def _bind() -> ctypes.CDLL | None:
    import hashlib

    hashlib.sha256()  # _hashlib has mapped libcrypto: dlopen below returns the same copy
    for soname in _SONAMES:
        try:
            lib = ctypes.CDLL(soname)
        except OSError:
            continue
        try:
            _prototypes(lib)
        except AttributeError:  # a libcrypto without raw Ed25519 keys (before 1.1.1)
            continue
        if not _verify_openssl(lib, _PROBE_KEY, _PROBE_SIG, b""):
            continue
        return lib
    return None


def _prototypes(lib: ctypes.CDLL) -> None:
    vp, cp, sz, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int
    for name, res, args in (
        ("EVP_PKEY_new_raw_public_key", vp, [i, vp, cp, sz]),
        ("EVP_PKEY_free", None, [vp]),
        ("EVP_MD_CTX_new", vp, []),
        ("EVP_MD_CTX_free", None, [vp]),
        ("EVP_DigestVerifyInit", i, [vp, vp, vp, vp, vp]),
        ("EVP_DigestVerify", i, [vp, cp, sz, cp, sz]),
        ("ERR_clear_error", None, []),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def _verify_openssl(lib: ctypes.CDLL, key: bytes, sig: bytes, msg: bytes) -> bool:
    pkey = lib.EVP_PKEY_new_raw_public_key(_NID_ED25519, None, key, len(key))
    if not pkey:
        lib.ERR_clear_error()
        return False
    ctx = lib.EVP_MD_CTX_new()
    try:
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new failed")
        ok = bool(lib.EVP_DigestVerifyInit(ctx, None, None, None, pkey) == 1
                  and lib.EVP_DigestVerify(ctx, sig, len(sig), msg, len(msg)) == 1)
        if not ok:  # a refusal leaves an entry on the thread's error queue: hashlib reads it
            lib.ERR_clear_error()
        return ok
    finally:
        lib.EVP_MD_CTX_free(ctx)
        lib.EVP_PKEY_free(pkey)


def verify_with_cryptography(key: bytes, sig: bytes, msg: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        ed25519.Ed25519PublicKey.from_public_bytes(key).verify(sig, msg)
    except (InvalidSignature, ValueError):
        return False
    return True


__all__ = ["backend", "verify", "verify_with_cryptography"]
