"""The device's trust store: read the keyring and the CRLs a bundle is judged by, keep new CRLs.

One ``TrustStore`` serves one installer run (slots in ``agent.device.updater``, models in
``agent.device.models``): it reads the keyring file once, hands the core
(``agent.core.trust.verify_head``) the device's facts — compatible, security floor,
best-known time — and, once the installer's own checks pass too, ``accept`` records what
the bundle taught: a later trusted time and the newest root-signed CRL of each root.
``remember_trial`` keeps the accepted bundle's signer, and before its trial commits
``distrust_trial`` looks at it again (``agent.core.signer``).

Files:
    device.keyring            trusted roots (PEM); checked against the root of trust first
    device.crl_dir/*.crl      the operator's CRLs: all read, a damaged one stops installs
    STATE/crls/<root>.crl     the agent's own store: one CRL per root, replaced atomically,
    STATE/crls/<root>-<scope>.crl   and the newest partial one (delta, scoped) of each scope
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from agent.adapters.bundle import Head
from agent.adapters.fsutil import atomic_write
from agent.adapters.journal import Journal
from agent.core import signer, trust
from agent.core.config import AgentConfig
from agent.errors import ConfigError, EdgeopsError

MAX_CRL_FILES = 256  # in the operator's crl_dir: one per root is normal
TRIAL_SIGNER = "trial_signer"  # journal key: the signer of the slot being installed or tried


class KeyringRoot(Protocol):
    """The part of the root of trust (``agent.adapters.rot``) that judging a bundle needs."""

    def check_keyring(self, keyring_pem: bytes) -> None: ...
    def floor(self) -> int: ...


class TrustStore:
    """One installer's view of the keyring and CRLs; the keyring is read once, on first use."""

    def __init__(self, cfg: AgentConfig, journal: Journal, root: KeyringRoot | None) -> None:
        self.keyring_path = cfg.keyring
        self.crl_dir = cfg.crl_dir
        self.own_dir = cfg.state_dir / "crls"
        self.compatible = cfg.compatible
        self.journal = journal
        self.root = root
        self._pem: bytes | None = None
        self._keyring: trust.Keyring | None = None

    # --- judging a bundle ----------------------------------------------------------------------
    def verify(self, head: Head, now: float, *, device_floor: bool = True, floor_at_least: int = 0,
               time_at_least: int = 0) -> trust.Verdict:
        """Decide trust in a bundle's signed head with this device's keyring, CRLs and floor.

        Changes nothing on the device. ``device_floor=False`` leaves anti-rollback to the
        caller: a model has its own floor, which it can only look up once the signed
        manifest has named the model. ``floor_at_least`` and ``time_at_least`` are what the
        journal's witness knows (agent.core.witness): a journal lost or replaced cannot take
        the floor or the best-known time down with it.
        """
        pem = self.keyring_pem()
        floor = max(self.journal.security_floor, floor_at_least) if device_floor else 0
        if self.root is not None:
            self.root.check_keyring(pem)  # a keyring swapped on disk is refused before it is used
            if device_floor:
                floor = max(floor, self.root.floor())  # the TPM's floor survives a re-imaged journal
        keyring = self.keyring()
        facts = trust.DeviceFacts(
            compatible=self.compatible,
            security_floor=floor,
            best_known_time=trust.best_known_time(now, max(self.journal.trusted_time, time_at_least)),
        )
        crls = [*self.stored_crls(), *([head.crl] if head.crl else [])]
        return trust.verify_head(manifest_bytes=head.manifest_bytes, signature=head.signature,
                                 chain_pem=head.chain_pem, keyring=keyring, device=facts,
                                 crls=crls)

    def accept(self, verdict: trust.Verdict) -> None:
        """What an accepted bundle teaches the device: a later trusted time, newer CRLs. Called
        only when nothing will refuse the bundle any more, so a refusal changes nothing."""
        self.journal.raise_trusted_time(min(verdict.manifest.build_time, verdict.signer_not_after))
        self.keep_crls(verdict.crls)

    # --- a trial armed before a CRL or an expiry --------------------------------------------------
    def remember_trial(self, head: Head, target: str, version: str) -> None:
        """Keep what the trial of an accepted bundle must look at again before it commits."""
        rec = signer.record_of(head.chain_pem, self.keyring()).to_dict()
        self.journal.put(TRIAL_SIGNER, {**rec, "target": target, "version": version})

    def distrust_trial(self, now: float) -> str | None:
        """Why the trial in the journal must not commit now — its signer revoked by a CRL this
        device holds, or expired at the best-known time — or None. CRLs or a keyring that
        cannot be read are a reason too (fail closed: the operator meant to revoke something).
        A trial armed by an older agent, or recovered without its record, is not looked at."""
        st, kept = self.journal.state(), self.journal.get(TRIAL_SIGNER)
        if not isinstance(kept, dict) or (kept.get("target"), kept.get("version")) != (st.target, st.version):
            return None
        try:
            rec = signer.SignerRecord.from_dict(kept)
            crls, keyring = self.stored_crls(), self.keyring()
        except (KeyError, TypeError, ValueError):
            return "its signer record in the journal is damaged"
        except EdgeopsError as exc:
            return f"its signer cannot be checked: {exc}"
        return signer.distrust(rec, crls=crls, keyring=keyring,
                               best_known_time=trust.best_known_time(now, self.journal.trusted_time))

    # --- the keyring ---------------------------------------------------------------------------
    def keyring_pem(self) -> bytes:
        if self._pem is None:
            try:
                self._pem = self.keyring_path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read keyring {self.keyring_path}: {exc.strerror}",
                                  hint="check device.keyring in the agent config") from None
        return self._pem

    def keyring(self) -> trust.Keyring:
        if self._keyring is None:
            self._keyring = trust.Keyring.from_pem(self.keyring_pem())
        return self._keyring

    # --- the CRLs ------------------------------------------------------------------------------
    def stored_crls(self) -> list[bytes]:
        """The operator's CRLs and the agent's own. Never truncated: dropping a file could drop
        the one CRL that revokes a signer; the agent's own store is pruned to one per root."""
        out = []
        if self.crl_dir is not None and self.crl_dir.is_dir():
            files = sorted(self.crl_dir.glob("*.crl"))
            if len(files) > MAX_CRL_FILES:
                raise ConfigError(f"{self.crl_dir} holds {len(files)} CRL files, more than "
                                  f"{MAX_CRL_FILES}", hint="keep only the newest CRL of each root there")
            for path in files:
                blob = path.read_bytes()
                if not trust.parses_as_crl(blob):  # fail closed: the operator meant to revoke something
                    raise ConfigError(f"{path} is not a CRL of at most {trust.MAX_CRL_BYTES} bytes",
                                      hint="replace it with the root's revoked.crl, or remove it")
                out.append(blob)
        if self.own_dir.is_dir():
            out += [p.read_bytes() for p in sorted(self.own_dir.glob("*.crl"))]
        return out

    def keep_crls(self, crls: Sequence[trust.KeptCrl]) -> None:
        """Store the newest root-verified CRL of each root (and of each partial scope a root
        issues, ``KeptCrl.file``), one file each, replaced atomically.

        Installers of slots and of models may run at once (they hold different locks): each
        writes through its own temporary file, and never replaces a newer CRL with an older one.
        """
        d = self.own_dir
        for kept in crls:
            path = d / kept.file
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                current = None
            if current == kept.blob:
                continue
            if current is not None and self._newer_or_same(current, kept):
                continue
            d.mkdir(parents=True, exist_ok=True)
            atomic_write(path, kept.blob)
        if crls and d.is_dir():
            keep = {k.file for k in crls}
            for old in d.glob("*.crl"):  # older names, roots no longer trusted, deltas superseded
                if old.name not in keep:
                    old.unlink(missing_ok=True)

    def _newer_or_same(self, current: bytes, kept: trust.KeptCrl) -> bool:
        _, have = trust.revoked_serials([current], self.keyring().roots)
        return any(h.file == kept.file and h.rank >= kept.rank for h in have)
