"""Factory provisioning: record the factory slot as committed and good, with the first floor.

A device image leaves the factory with one slot written and no history. Without a record of
that slot the agent shows it as ``empty``, cannot roll back to it after the first update
("slot A holds no known-good version") and starts with a security floor of 0. ``provision``
writes what ``edgeops sim init`` writes for a simulated board, through the same journal API:
the factory slot ``good`` with its version and security_version, the other slots ``empty``,
the floor raised to the factory's security_version, the best-known time, and one
``provisioned`` history row.

It runs at image build time against the image's tree (``--root``: the state directory is
looked up below that root, so the journal lands on the data partition's contents) or on the
device's first boot (edgeops-provision.service), and is idempotent: once the journal holds a
``provisioned`` row a second run changes nothing. A journal that already records updates but
was never provisioned is not a factory device; it is refused rather than overwritten.
Where the config names a TPM, ``anchor_tpm`` then anchors the keyring and creates the
anti-rollback counter (the same, idempotent ``RootOfTrust.provision`` that ``edgeops tpm
provision`` runs) and carries the journal's floor into it, so a TPM-required board can install
without a person having run anything by hand. The fleet identity's enrolment request stays
``edgeops tpm provision``'s job.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from agent.adapters import bootloader as bootloader_mod
from agent.adapters import rot
from agent.adapters.journal import MAX_HISTORY, Journal
from agent.adapters.runtime import LinuxRuntime
from agent.core import lifecycle
from agent.core.config import AgentConfig
from agent.errors import BootloaderError, ConfigError, StateError

PROVISIONED = "provisioned"  # the history event, as agent.host.sim's init_device writes it
MAX_ROWS = MAX_HISTORY
FACTORY_KEY = "factory"  # journal kv: the factory release; history rows are pruned, kv is not


@dataclass(frozen=True)
class Factory:
    """The release a device image was built with, in the slot it was written to."""

    slot: str
    version: str
    security_version: int


@dataclass(frozen=True)
class Result:
    changed: bool
    factory: Factory | None  # what the journal records as the factory release
    floor: int
    message: str


def factory_records(f: Factory, slots: tuple[str, ...], detail: str) -> list[lifecycle.Record]:
    """What a fresh journal gets: the factory slot good, the others empty, the floor raised."""
    return [lifecycle.SlotRecord(f.slot, "good", f.version, f.security_version),
            *(lifecycle.SlotRecord(s, "empty") for s in slots if s != f.slot),
            lifecycle.RaiseFloor(f.security_version),
            lifecycle.History(PROVISIONED, f.slot, f.version, detail)]


def read_release(path: Path) -> tuple[str, int]:
    """The image's own release file (``version = "1.0"``, ``security_version = 1``)."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}",
                          hint="pass --version and --security-version") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    version, sv = doc.get("version"), doc.get("security_version", 0)
    if not isinstance(version, str) or not version or type(sv) is not int or sv < 0:
        raise ConfigError(f"{path} must hold version = \"X\" and security_version = N (N >= 0)")
    return version, sv


def rooted(cfg: AgentConfig, root: Path | None) -> AgentConfig:
    """The config as seen from an image tree: its absolute state_dir below ``root``."""
    if root is None:
        return cfg
    return cfg.replace(state_dir=root / cfg.state_dir.relative_to(cfg.state_dir.anchor))


def _recorded(journal: Journal) -> Factory | None:
    """The factory release this journal was provisioned with, or None if it never was."""
    doc = journal.get(FACTORY_KEY)
    if isinstance(doc, dict):
        return Factory(str(doc["slot"]), str(doc["version"]), int(doc["security_version"]))
    if not journal.event_counts().get(PROVISIONED):
        return None
    # provisioned by 'sim init', or a power cut fell between the records and the kv key
    row = next(h for h in journal.history(limit=MAX_ROWS) if h.event == PROVISIONED)
    info = journal.slots().get(row.slot or "")
    sv = info.security_version if info is not None and info.version == row.version else None
    return Factory(row.slot or "", row.version or "", sv or 0)


def _remember(journal: Journal, f: Factory) -> None:
    journal.put(FACTORY_KEY, {"slot": f.slot, "version": f.version,
                              "security_version": f.security_version})


def provision(cfg: AgentConfig, factory: Factory, *, detail: str = "factory image",
              now: float | None = None) -> Result:
    """Record ``factory`` in the journal of ``cfg`` unless it is provisioned already."""
    if factory.slot not in cfg.slots:
        raise ConfigError(f"no slot named {factory.slot!r} ({'/'.join(cfg.slots)})")
    if factory.security_version < 0:
        raise ConfigError("security_version must be 0 or more")
    journal = Journal(cfg.journal_path)
    try:
        done = _recorded(journal)
        if done is not None:
            if journal.get(FACTORY_KEY) is None:
                _remember(journal, done)  # finish a provisioning a power cut interrupted
            return Result(False, done, journal.security_floor,
                          f"already provisioned: slot {done.slot} {done.version} "
                          f"(security_version {done.security_version}); nothing changed")
        if journal.slots() or journal.state().phase is not lifecycle.Phase.IDLE or journal.history(1):
            raise StateError(f"the journal {cfg.journal_path} already records slots or updates "
                             f"but no factory provisioning",
                             hint="provision a device only as it leaves the factory "
                                  "(a fresh data partition)")
        now = time.time() if now is None else now
        journal.record(factory_records(factory, tuple(cfg.slots), detail), now=now)
        journal.raise_trusted_time(int(now))
        _remember(journal, factory)
        return Result(True, factory, journal.security_floor,
                      f"provisioned: slot {factory.slot} {factory.version} committed and good, "
                      f"security floor {journal.security_floor}")
    finally:
        journal.close()


def booted_factory_slot(cfg: AgentConfig) -> str:
    """On the device: the slot running now, which the bootloader must also boot first."""
    slot = LinuxRuntime(tuple(cfg.slots)).booted_slot()
    bl = bootloader_mod.create(cfg.bootloader, cfg.bootloader_settings, cfg.base, tuple(cfg.slots))
    try:
        primary = bl.primary()
    except BootloaderError as exc:
        raise StateError(f"cannot provision: the bootloader state is unreadable: {exc.one_line()}") from None
    if primary != slot:
        raise StateError(f"running slot {slot} but the bootloader boots slot {primary} first; "
                         f"provision the factory slot only when it is the committed one")
    return slot


def anchor_tpm(cfg: AgentConfig) -> str | None:
    """Anchor the keyring and the counter in the TPM the config names; None if it names none."""
    settings = cfg.tpm  # parsed once with the rest of agent.toml
    if settings.tcti is None and not settings.required:
        return None
    root = rot.open_root(settings, cfg.state_dir)  # TpmRequired when it is required but absent
    try:
        keyring = cfg.keyring.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read keyring {cfg.keyring}: {exc.strerror}") from None
    status = root.provision(keyring)
    journal = Journal(cfg.journal_path)
    try:
        floor = journal.security_floor
    finally:
        journal.close()
    if floor > (status.floor or 0):
        root.raise_floor(floor)  # the TPM's counter never goes below what the journal holds
    return f"keyring anchored in the {root.kind}, rollback floor {max(floor, status.floor or 0)}"
