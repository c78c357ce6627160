"""Secure decommission: erase what makes this device a fleet member, leaving a documented state.

``provision``'s other end (agent.device.provision). What goes, in this order:

  1. a ``decommissioning`` marker in the state directory (the data partition): a run that a
     power cut stopped is finished by running it again; every step below is idempotent
  2. the identity: the sealed identity key and its certificate (STATE/identity, the sealed
     blobs in STATE/tpm), overwritten with zeros, synced, then unlinked
  3. the fleet credentials: the token file, ``fleet.toml`` beside agent.toml (it holds the
     token and the controller's address), the mTLS client key and certificate
  4. edgeops's TPM NV indices, the keyring anchor and the rollback counter (the TPM's other
     contents, and its owner hierarchy, are not edgeops's to touch)
  5. everything else in the state directory: the journal and its witness, the keystore, CRLs
     fetched, the model store, buffers; the marker last

The end state (docs/boards.md, "Decommission"): the slots keep their OS, the bootloader its
environment; the data partition holds nothing of edgeops's, so on the next boot
edgeops-provision.service records the running slot as a factory device again, with the
image's release as its floor and a new TPM anchor. The device has no identity and no token:
rejoining a fleet is the factory's enrolment. The controller side, revoking the identity (the
CRL) and the token, is ``edgeops controller device revoke ID`` (its existing route).

Files on flash are overwritten and unlinked; wear levelling may keep old copies, so a board
that must guarantee more discards or reformats the data partition (blkdiscard) by its policy.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from agent.adapters import fsutil
from agent.core.config import AgentConfig
from agent.errors import DeviceBusy, StateError

MARKER = "decommissioning"
MAX_WIPE = 1 << 20  # bytes of a key or token file overwritten; larger files are only unlinked


@dataclass
class Report:
    erased: list[str] = field(default_factory=list)  # what went, for a person
    left: list[str] = field(default_factory=list)  # what this device cannot erase itself


def _wipe(path: Path, report: Report, what: str) -> None:
    """Overwrite a small file with zeros, sync it, unlink it; links are unlinked, not followed."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if path.is_file() and not path.is_symlink() and st.st_size <= MAX_WIPE:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, b"\0" * st.st_size)
            os.fsync(fd)
        finally:
            os.close(fd)
    path.unlink()
    fsutil.fsync_dir(path.parent)
    report.erased.append(f"{what} {path}")


def _wipe_tree(path: Path, report: Report, what: str) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        for f in sorted(path.rglob("*")):
            if f.is_file() and not f.is_symlink():
                _wipe(f, Report(), what)
        shutil.rmtree(path)
        report.erased.append(f"{what} {path}")
    else:
        _wipe(path, report, what)


def credential_files(cfg: AgentConfig) -> list[tuple[str, Path]]:
    """The fleet credentials on disk: token file, fleet.toml, the mTLS client key and cert."""
    from agent.device.fleet_files import FLEET_TOML, find_fleet
    from agent.errors import ConfigError

    out: list[tuple[str, Path]] = []
    try:
        fleet = find_fleet(cfg)
    except ConfigError:
        fleet = None  # a broken fleet.toml is erased all the same
    if fleet is not None:
        for what, p in (("token file", fleet.token_file), ("mTLS client key", fleet.client_key),
                        ("mTLS client certificate", fleet.client_cert)):
            if p is not None:
                out.append((what, p))
    out.append(("fleet settings and token", cfg.path.parent / FLEET_TOML))
    return out


def decommission(cfg: AgentConfig, *, tpm: bool = True) -> Report:
    """Erase this device's fleet membership (steps 1-5 above). Idempotent."""
    state = cfg.state_dir
    if not state.is_dir():
        raise StateError(f"state directory {state} does not exist: nothing to decommission",
                         hint="mount the data partition first (board check)")
    # the updater's device lock (agent.device.updater.Updater.locked): no agent, install or
    # technician's command runs while the journal goes
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeviceBusy("another edgeops process holds the device lock",
                             hint="stop edgeops-agent.service first") from None
        return _erase(cfg, state, tpm)
    finally:
        os.close(fd)


def _erase(cfg: AgentConfig, state: Path, tpm: bool) -> Report:
    report = Report()
    fsutil.atomic_write(state / MARKER, b"edgeops decommission in progress\n", mode=fsutil.PUBLIC)
    _wipe_tree(state / "identity", report, "identity certificate")
    _wipe_tree(state / "tpm", report, "sealed identity key and TPM blobs")
    for what, path in credential_files(cfg):
        _wipe(path, report, what)
    if cfg.fleet is not None and cfg.fleet.token:
        report.left.append(f"a token inline in {cfg.path} [fleet]: the controller's revoke "
                           f"refuses it; remove it from the image")
    if tpm and cfg.tpm.tcti is not None:
        from agent.adapters.rot.tpm import TpmRoot

        report.erased += TpmRoot(cfg.tpm, state).erase()
    if cfg.witness is not None:
        _wipe(cfg.witness, report, "journal witness")
    for entry in sorted(state.iterdir()):
        if entry.name == "lock":
            entry.unlink()  # ours, held until the end: no content, nothing to report
        elif entry.name != MARKER:
            _wipe_tree(entry, report, "state")
    (state / MARKER).unlink()
    report.erased.append(f"decommission marker {state / MARKER}")
    return report
