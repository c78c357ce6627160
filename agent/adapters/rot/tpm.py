"""The TPM 2.0 root of trust: ``RootOfTrust`` over tpm2-pytss (ESAPI).

TPM objects (docs/tpm.md has the reasoning):
- keyring anchor: NV index ``anchor_index`` (default 0x01000E00), owner hierarchy,
  ordinary index, attributes OWNERWRITE|OWNERREAD|AUTHREAD|WRITEDEFINE|NO_DA, empty
  authValue (anyone may read, only the owner may write). Written once at
  provisioning, then TPM2_NV_WriteLock'ed: with WRITEDEFINE the lock lasts until
  the index is deleted, so no reboot clears it. Content: ``agent.core.anchor.AnchorRecord``
  (magic, SHA-256 of the trusted roots, and the counter's base value).
- rollback floor: NV counter (TPM2_NT_COUNTER) ``counter_index`` (default
  0x01000E01), OWNERWRITE|OWNERREAD|AUTHREAD|NO_DA. A TPM starts a new counter at
  the highest value any counter ever had, so floor = counter - base (base stored
  in the locked anchor): even deleting and re-creating the counter cannot lower it.
- measurements: SHA-256 bank of PCR ``pcr`` (default 15), one extend per event;
  the event log lives in the state dir, the verifier replays it.
- attestation key: a restricted ECC P-256 signing primary in the endorsement
  hierarchy. Primaries are derived from the hierarchy seed and the template, so
  the same key comes back after a re-image without storing anything.
- sealed secrets: keyedhash objects under an owner ECC storage primary; only the
  wrapped blobs sit on disk, and only this TPM can unseal them.

tpm2_pytss is imported lazily so the agent without the ``[tpm]`` extra still imports;
its objects are ``Any`` (it ships no type hints).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent.adapters import fsutil
from agent.adapters.rot.base import (
    KeyringMismatch,
    NotProvisioned,
    Quote,
    RootOfTrust,
    RootStatus,
    TpmError,
    TpmUnavailable,
)
from agent.adapters.rot.eventlog import EventLog
from agent.core.anchor import RECORD_SIZE, AnchorRecord, keyring_anchor, verify_rotation
from agent.core.attest import MAX_NONCE, Event
from agent.core.config import TpmSettings
from agent.errors import ConfigError

# Each floor step is one TPM2_NV_Increment (NV wear, ~ms each on real parts), so
# security_version is meant to grow by small steps; larger jumps are capped here
# and still enforced in full by the journal floor.
MAX_FLOOR_STEP = 256


def _tss() -> Any:
    # Quiet the TSS's own stderr logging of expected errors (e.g. "index not defined").
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    try:
        import tpm2_pytss  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError as exc:
        raise TpmUnavailable(f"tpm2-pytss is not installed ({exc.name})") from None
    return tpm2_pytss


def _ak_template(tss: Any) -> Any:
    t = tss.TPMT_PUBLIC.parse(
        "ecc256:ecdsa-sha256",
        objectAttributes="fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda")
    t.parameters.eccDetail.symmetric.algorithm = tss.TPM2_ALG.NULL  # a signing key has no cipher
    return t


def _srk_template(tss: Any) -> Any:
    return tss.TPMT_PUBLIC.parse(
        "ecc256:aes128cfb",
        objectAttributes="fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda")


class TpmRoot:
    """A TPM reached through ``settings.tcti``; each call opens one ESAPI context and closes it."""

    kind = "tpm"

    def __init__(self, settings: TpmSettings, state_dir: Path) -> None:
        if settings.tcti is None:
            raise ConfigError("TpmRoot needs a TCTI")
        self.tcti: str = settings.tcti
        self.settings = settings
        self.state_dir = state_dir
        self.log = EventLog(state_dir / "tpm" / "measurements.jsonl")

    # -- plumbing --
    @contextmanager
    def _esys(self) -> Iterator[tuple[Any, Any]]:
        tss = _tss()
        try:
            ectx = tss.ESAPI(self.tcti)
        except Exception as exc:  # TCTI load or connect failure: several exception types
            raise TpmUnavailable(f"cannot open TPM '{self.tcti}': {exc}") from None
        try:
            yield tss, ectx
        except tss.TSS2_Exception as exc:
            raise TpmError(f"TPM command failed: {exc}") from None
        finally:
            ectx.close()

    def ping(self) -> None:
        with self._esys() as (_, e):
            e.get_random(8)

    @staticmethod
    def _nv(tss: Any, e: Any, index: int) -> Any | None:
        try:
            return e.tr_from_tpmpublic(index)
        except tss.TSS2_Exception:
            return None  # not defined

    def _define(self, tss: Any, e: Any, index: int, attrs: Any, size: int) -> Any:
        pub = tss.TPM2B_NV_PUBLIC(nvPublic=tss.TPMS_NV_PUBLIC(
            nvIndex=index, nameAlg=tss.TPM2_ALG.SHA256, attributes=attrs, dataSize=size))
        return e.nv_define_space(b"", pub)

    def _read_anchor(self, tss: Any, e: Any) -> tuple[bytes, int, bool] | None:
        h = self._nv(tss, e, self.settings.anchor_index)
        if h is None:
            return None
        pub, _ = e.nv_read_public(h)
        attrs = pub.nvPublic.attributes
        if not attrs & tss.TPMA_NV.WRITTEN:
            return None
        try:
            record = AnchorRecord.from_bytes(bytes(e.nv_read(h, RECORD_SIZE, 0, auth_handle=h)))
        except ValueError:
            raise TpmError(f"NV index {self.settings.anchor_index:#x} holds something other than "
                           f"an edgeops anchor", hint="choose another tpm anchor_index") from None
        return record.anchor, record.base, bool(attrs & tss.TPMA_NV.WRITELOCKED)

    def _counter(self, tss: Any, e: Any, create: bool) -> tuple[Any, int] | None:
        h = self._nv(tss, e, self.settings.counter_index)
        if h is None:
            if not create:
                return None
            attrs = (tss.TPMA_NV.OWNERWRITE | tss.TPMA_NV.OWNERREAD | tss.TPMA_NV.AUTHREAD
                     | tss.TPMA_NV.NO_DA | (tss.TPM2_NT.COUNTER << tss.TPMA_NV.TPM2_NT_SHIFT))
            h = self._define(tss, e, self.settings.counter_index, attrs, 8)
        pub, _ = e.nv_read_public(h)
        if not pub.nvPublic.attributes & tss.TPMA_NV.WRITTEN:
            if not create:
                return None
            e.nv_increment(h, auth_handle=tss.ESYS_TR.OWNER)  # a counter is readable once incremented
        return h, int.from_bytes(bytes(e.nv_read(h, 8, 0, auth_handle=h)), "big")

    def _write_anchor(self, tss: Any, e: Any, anchor: bytes, base: int) -> None:
        attrs = (tss.TPMA_NV.OWNERWRITE | tss.TPMA_NV.OWNERREAD | tss.TPMA_NV.AUTHREAD
                 | tss.TPMA_NV.WRITEDEFINE | tss.TPMA_NV.NO_DA)
        h = self._define(tss, e, self.settings.anchor_index, attrs, RECORD_SIZE)
        e.nv_write(h, AnchorRecord(anchor, base).to_bytes(), 0, auth_handle=tss.ESYS_TR.OWNER)
        e.nv_write_lock(h, auth_handle=tss.ESYS_TR.OWNER)

    def erase(self) -> list[str]:
        """Undefine edgeops's NV indices, the keyring anchor and the rollback counter (owner
        authorisation), for a decommission (agent.device.decommission). Idempotent; the
        TPM's other indices and hierarchies are left alone."""
        gone = []
        with self._esys() as (tss, e):
            for what, index in (("keyring anchor", self.settings.anchor_index),
                                ("rollback counter", self.settings.counter_index)):
                h = self._nv(tss, e, index)
                if h is not None:
                    e.nv_undefine_space(h)
                    gone.append(f"TPM NV index {index:#x} ({what})")
        return gone

    # -- RootOfTrust --
    def provision(self, keyring_pem: bytes) -> RootStatus:
        """Anchor the keyring and create the counter; idempotent for the same keyring.

        A re-imaged device is provisioned again: the counter is kept (the floor
        survives) and a *different* keyring is refused — that needs a rotation.
        """
        anchor = keyring_anchor(keyring_pem)
        with self._esys() as (tss, e):
            found = self._read_anchor(tss, e)
            if found is not None:
                if found[0] != anchor:
                    raise KeyringMismatch("this TPM already anchors a different keyring",
                                          hint="rotate roots with a signed rotation, not by provisioning")
                # A deleted counter comes back at the highest count this TPM ever held, so
                # re-creating it here cannot lower the floor.
                self._counter(tss, e, create=True)
            else:
                counter = self._counter(tss, e, create=True)
                assert counter is not None
                stale = self._nv(tss, e, self.settings.anchor_index)
                if stale is not None:  # defined but never written: an interrupted provisioning
                    e.nv_undefine_space(stale)
                self._write_anchor(tss, e, anchor, counter[1])
        return self.status()

    def _anchor_or_raise(self, tss: Any, e: Any) -> tuple[bytes, int, bool]:
        found = self._read_anchor(tss, e)
        if found is None:
            raise NotProvisioned(f"the TPM holds no keyring anchor at {self.settings.anchor_index:#x}")
        return found

    def check_keyring(self, keyring_pem: bytes) -> None:
        with self._esys() as (tss, e):
            anchored, _, _ = self._anchor_or_raise(tss, e)
        if keyring_anchor(keyring_pem) != anchored:
            raise KeyringMismatch("the keyring on disk does not match the TPM anchor")

    def rotate_keyring(self, current_pem: bytes, new_pem: bytes, signature: bytes) -> None:
        """Replace the anchor: undefine (owner auth), define, write, lock. Order matters for
        power loss: the new anchor is written before the caller replaces the keyring file, and
        an interrupted rotation leaves an unwritten index, which provision/check report."""
        new_anchor = verify_rotation(current_pem, new_pem, signature)
        with self._esys() as (tss, e):
            anchored, base, _ = self._anchor_or_raise(tss, e)
            if anchored == new_anchor:
                return  # already done: a retry after a crash before the keyring file was replaced
            if anchored != keyring_anchor(current_pem):
                raise KeyringMismatch("the current keyring does not match the TPM anchor")
            h = self._nv(tss, e, self.settings.anchor_index)
            e.nv_undefine_space(h)
            self._write_anchor(tss, e, new_anchor, base)

    def floor(self) -> int:
        with self._esys() as (tss, e):
            _, base, _ = self._anchor_or_raise(tss, e)
            counter = self._counter(tss, e, create=False)
        if counter is None:
            raise NotProvisioned("the TPM rollback counter is missing")
        return counter[1] - base

    def raise_floor(self, security_version: int) -> int:
        """Increment the counter up to ``security_version`` (never down); return the new floor."""
        with self._esys() as (tss, e):
            _, base, _ = self._anchor_or_raise(tss, e)
            counter = self._counter(tss, e, create=False)
            if counter is None:
                raise NotProvisioned("the TPM rollback counter is missing")
            h, value = counter
            steps = min(max(0, security_version - (value - base)), MAX_FLOOR_STEP)
            for _ in range(steps):
                e.nv_increment(h, auth_handle=tss.ESYS_TR.OWNER)
            return value + steps - base

    def _pcr_value(self, tss: Any, e: Any) -> bytes:
        _, _, values = e.pcr_read(f"sha256:{self.settings.pcr}")
        return bytes(values[0])

    def _fresh_log(self, tss: Any, e: Any) -> list[Event]:
        # After a TPM reset the PCR is zero again while the file remains: start a new log.
        events = self.log.events()
        if events and self._pcr_value(tss, e) == bytes(32):
            self.log.reset()
            return []
        return events

    def measure(self, label: str, digest: bytes, *, once: bool = False) -> None:
        """Extend the PCR; with ``once``, skip an event already measured since this TPM reset
        (the booted slot is measured once per boot, however many agent cycles run)."""
        event = Event(self.settings.pcr, label, digest)
        with self._esys() as (tss, e):
            if once and event in self._fresh_log(tss, e):
                return
            self._fresh_log(tss, e)
            self.log.append(event)  # log first: a verifier can tolerate a logged, unextended event
            handle = getattr(tss.ESYS_TR, f"PCR{self.settings.pcr}")
            e.pcr_extend(handle, tss.TPML_DIGEST_VALUES([tss.TPMT_HA(
                hashAlg=tss.TPM2_ALG.SHA256, digest=tss.TPMU_HA(sha256=event.extend_value()))]))

    @contextmanager
    def _primary(self, tss: Any, e: Any, hierarchy: Any, template: Any) -> Iterator[tuple[Any, Any]]:
        handle, public, _, _, _ = e.create_primary(
            tss.TPM2B_SENSITIVE_CREATE(), tss.TPM2B_PUBLIC(publicArea=template), hierarchy)
        try:
            yield handle, public
        finally:
            e.flush_context(handle)  # no resource manager on swtpm/raw devices: slots are few

    def ak_public_pem(self) -> bytes:
        with self._esys() as (tss, e), self._primary(tss, e, tss.ESYS_TR.ENDORSEMENT,
                                                     _ak_template(tss)) as (_, public):
            return bytes(public.to_pem())

    def quote(self, nonce: bytes) -> Quote:
        if not 8 <= len(nonce) <= MAX_NONCE:
            raise TpmError(f"nonce must be 8 to {MAX_NONCE} bytes, got {len(nonce)}")
        pcr = self.settings.pcr
        with self._esys() as (tss, e):
            events = self._fresh_log(tss, e)
            with self._primary(tss, e, tss.ESYS_TR.ENDORSEMENT, _ak_template(tss)) as (ak, public):
                quoted, sig = e.quote(ak, f"sha256:{pcr}", nonce)
                ak_pem = bytes(public.to_pem())
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        return Quote("tpm", bytes(quoted), encode_dss_signature(r, s), ak_pem, (pcr,), tuple(events))

    def _sealed_path(self, name: str) -> Path:
        if not name.isidentifier():
            raise ValueError(f"bad sealed object name {name!r}")
        return self.state_dir / "tpm" / f"{name}.sealed"

    def seal(self, name: str, secret: bytes) -> None:
        with self._esys() as (tss, e), self._primary(tss, e, tss.ESYS_TR.OWNER,
                                                     _srk_template(tss)) as (srk, _):
            sens = tss.TPM2B_SENSITIVE_CREATE(sensitive=tss.TPMS_SENSITIVE_CREATE(data=secret))
            tmpl = tss.TPMT_PUBLIC.parse("keyedhash",
                                         objectAttributes="fixedtpm|fixedparent|userwithauth|noda")
            private, public, _, _, _ = e.create(srk, sens, tss.TPM2B_PUBLIC(publicArea=tmpl))
        blob = bytes(private.marshal()) + bytes(public.marshal())
        fsutil.atomic_write(self._sealed_path(name), blob, mode=fsutil.SECRET, dir_mode=0o700)

    def unseal(self, name: str) -> bytes:
        path = self._sealed_path(name)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise NotProvisioned(f"no sealed '{name}' under {path.parent}") from None
        with self._esys() as (tss, e), self._primary(tss, e, tss.ESYS_TR.OWNER,
                                                     _srk_template(tss)) as (srk, _):
            private, used = tss.TPM2B_PRIVATE.unmarshal(blob)
            public, _ = tss.TPM2B_PUBLIC.unmarshal(blob[used:])
            obj = e.load(srk, private, public)
            try:
                return bytes(e.unseal(obj))
            finally:
                e.flush_context(obj)

    def status(self) -> RootStatus:
        with self._esys() as (tss, e):
            found = self._read_anchor(tss, e)
            counter = self._counter(tss, e, create=False)
            events = self._fresh_log(tss, e)
        if found is None:
            return RootStatus("tpm", None, False, None, counter[1] if counter else None,
                              self.settings.pcr, len(events))
        anchor, base, locked = found
        value = counter[1] if counter else None
        return RootStatus("tpm", anchor.hex(), locked, None if value is None else value - base, value,
                          self.settings.pcr, len(events))


def _conforms(root: TpmRoot) -> RootOfTrust:
    return root  # mypy checks here that TpmRoot implements the interface


__all__ = ["MAX_FLOOR_STEP", "TpmRoot"]
