"""Every refusal of a bad bundle: one clear error, and nothing of the device changed.

"Nothing changed" means: the U-Boot environment bytes, the active slot's content
and the life-cycle state are as before, the journal records the refusal, and —
for anything caught before the payload — the inactive slot was never written
(its sparse file still has no allocated block).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import time
from pathlib import Path

import pytest

from agent.adapters import bundle
from agent.core import lifecycle, tarstream
from agent.device.updater import Updater
from agent.errors import (
    BundleError,
    ConfigError,
    HashMismatch,
    IncompatibleBundle,
    PayloadTooLarge,
    RollbackRefused,
    SignatureError,
    SignerExpired,
    SignerRevoked,
    TruncatedBundle,
    UnsafeMember,
    UntrustedSigner,
)
from agent.host import bundle_writer, keys
from tests.conftest import BundleFactory, Keys, allocated_blocks, make_image


def snapshot(device_dir: Path, updater: Updater) -> tuple[object, ...]:
    """Everything a refusal must leave alone: boot config, active slot, journal state and records."""
    env = (device_dir / "uboot.env").read_bytes()
    slot_a = hashlib.sha256((device_dir / "slot-a.img").read_bytes()).hexdigest()
    j = updater.journal
    return env, slot_a, j.state().to_dict(), j.slots(), j.security_floor


def install_bytes(updater: Updater, data: bytes) -> None:
    updater.install(io.BytesIO(data))


def assert_refused(updater: Updater, device_dir: Path, data: bytes, error: type[Exception],
                   match: str | None = None, *, slot_untouched: bool = True) -> None:
    before = snapshot(device_dir, updater)
    with pytest.raises(error, match=match):
        install_bytes(updater, data)
    assert snapshot(device_dir, updater) == before
    last = updater.journal.history(1)[0]
    assert last.event in ("refused", "failed")
    if slot_untouched:
        assert allocated_blocks(device_dir / "slot-b.img") == 0


def members(data: bytes) -> list[tuple[str, int, int]]:
    """(name, header offset, size) of each member."""
    out, off = [], 0
    while True:
        m = tarstream.parse_header(data[off:off + 512])
        if m is None:
            return out
        out.append((m.name, off, m.size))
        off += 512 + m.size + tarstream.padding(m.size)


def flip(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 0x01
    return bytes(b)


def test_flipped_payload_byte_stops_at_that_block(updater: Updater, device_dir: Path,
                                                  make_bundle: BundleFactory) -> None:
    data = make_bundle("2.0", size=600_000).read_bytes()
    _name, off, _size = members(data)[-1]
    bad_block = 5
    tampered = flip(data, off + 512 + bad_block * 65536 + 100)
    before = snapshot(device_dir, updater)
    with pytest.raises(HashMismatch, match=f"block {bad_block}"):
        install_bytes(updater, tampered)
    assert snapshot(device_dir, updater) == before
    # nothing from the bad block on reached the slot
    slot = (device_dir / "slot-b.img").read_bytes()
    assert slot[bad_block * 65536:] == bytes(len(slot) - bad_block * 65536)
    assert updater.journal.slots()["B"].state == "empty"


@pytest.mark.parametrize("member", ["manifest.sig", "manifest.json"])
def test_flipped_signed_byte_is_a_signature_error(updater: Updater, device_dir: Path,
                                                  make_bundle: BundleFactory, member: str) -> None:
    data = make_bundle("2.0").read_bytes()
    _, off, size = next(m for m in members(data) if m[0] == member)
    assert_refused(updater, device_dir, flip(data, off + 512 + size // 2), SignatureError)


def test_untrusted_signer_is_refused(updater: Updater, device_dir: Path, make_bundle: BundleFactory,
                                     tmp_path: Path) -> None:
    keys.init_root(tmp_path / "rogue-root")
    rogue = keys.issue_signer(tmp_path / "rogue-root", tmp_path / "rogue")
    data = make_bundle("2.0", signer=(rogue.key_path, rogue.cert_path)).read_bytes()
    assert_refused(updater, device_dir, data, UntrustedSigner, "not certified by a trusted root")


def test_expired_signer_is_refused(updater: Updater, device_dir: Path, make_bundle: BundleFactory,
                                   pki: Keys, tmp_path: Path) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    old = keys.issue_signer(pki.root, tmp_path / "old", days=10, not_before=start)
    data = make_bundle("2.0", signer=(old.key_path, old.cert_path),
                       build_time=int(start.timestamp()) + 3600).read_bytes()
    assert_refused(updater, device_dir, data, SignerExpired, "expired")


def revoked_signer(pki: Keys, where: Path, *, stale_crls: int = 0) -> tuple[keys.KeyPair, list[bytes]]:
    """A signer the root revokes, and the root's CRLs: ``stale_crls`` older ones, then the revoking one."""
    victim = keys.issue_signer(pki.root, where)
    crls = [keys.revoke(pki.root, []).read_bytes() for _ in range(stale_crls)]
    crls.append(keys.revoke(pki.root, [keys.cert_serial(victim.cert_path)]).read_bytes())
    return victim, crls


def by(signer: keys.KeyPair) -> tuple[Path, Path]:
    return signer.key_path, signer.cert_path


def test_revoked_signer_is_refused_via_crl_in_bundle(updater: Updater, device_dir: Path,
                                                     make_bundle: BundleFactory, pki: Keys,
                                                     tmp_path: Path) -> None:
    victim, (crl,) = revoked_signer(pki, tmp_path / "victim")
    data = make_bundle("2.0", signer=by(victim), crl=crl).read_bytes()
    assert_refused(updater, device_dir, data, SignerRevoked, "revoked")


def test_revocation_learned_from_one_bundle_sticks(updater: Updater, device_dir: Path,
                                                   make_bundle: BundleFactory, pki: Keys,
                                                   tmp_path: Path) -> None:
    victim, (crl,) = revoked_signer(pki, tmp_path / "victim2")
    # A good bundle carries the CRL to the device ...
    updater.install(io.BytesIO(make_bundle("2.0", crl=crl).read_bytes()))
    # ... and a later bundle by the revoked signer, without the CRL, is still refused.
    with pytest.raises(SignerRevoked):
        install_bytes(updater, make_bundle("2.1", signer=by(victim)).read_bytes())


def test_revoking_crl_is_honoured_among_many_stored_crls(updater: Updater, make_bundle: BundleFactory,
                                                         pki: Keys, tmp_path: Path) -> None:
    victim, crls = revoked_signer(pki, tmp_path / "victim3", stale_crls=40)
    store = updater.cfg.state_dir / "crls"
    store.mkdir(parents=True, exist_ok=True)
    for i, crl in enumerate(crls[:-1]):  # older CRLs a long-lived device may have gathered
        (store / f"{i:02d}.crl").write_bytes(crl)
    (store / "zz.crl").write_bytes(crls[-1])  # the revoking one sorts last among the files
    with pytest.raises(SignerRevoked):
        install_bytes(updater, make_bundle("2.0", signer=by(victim)).read_bytes())


def test_device_keeps_only_the_newest_crl_of_each_root(updater: Updater, make_bundle: BundleFactory,
                                                       pki: Keys, tmp_path: Path) -> None:
    victim, (older, newer) = revoked_signer(pki, tmp_path / "victim4", stale_crls=1)
    updater.install(io.BytesIO(make_bundle("2.0", crl=newer).read_bytes()))
    updater.install(io.BytesIO(make_bundle("2.1", crl=older).read_bytes()))  # a stale CRL arrives late
    stored = [p.read_bytes() for p in (updater.cfg.state_dir / "crls").glob("*.crl")]
    assert stored == [newer]
    with pytest.raises(SignerRevoked):
        install_bytes(updater, make_bundle("2.2", signer=by(victim)).read_bytes())


def test_two_payloads_for_one_slot_are_refused(updater: Updater, device_dir: Path, pki: Keys,
                                               tmp_path: Path) -> None:
    out = tmp_path / "two.bundle"
    srcs = [bundle_writer.PayloadSource(name, "rootfs", make_image(tmp_path / name, 4096, name), False, 65536)
            for name in ("rootfs", "rootfs2")]
    bundle_writer.create(out, sign=keys.load_signing_key(pki.signer_key).sign,
                  chain_pem=pki.signer_crt.read_bytes(), compatible="edgeops-sim", version="2.0",
                  security_version=1, build_time=int(time.time()), sources=srcs)
    assert_refused(updater, device_dir, out.read_bytes(), IncompatibleBundle, "two payloads target")


def test_incompatible_board_is_refused(updater: Updater, device_dir: Path,
                                       make_bundle: BundleFactory) -> None:
    data = make_bundle("2.0", compatible="other-board").read_bytes()
    assert_refused(updater, device_dir, data, IncompatibleBundle, "other-board")


def test_security_version_below_floor_is_refused(updater: Updater, device_dir: Path,
                                                 make_bundle: BundleFactory) -> None:
    updater.journal.record([lifecycle.RaiseFloor(5)])
    data = make_bundle("2.0", security_version=4).read_bytes()
    assert_refused(updater, device_dir, data, RollbackRefused, "below the device floor 5")


def test_payload_larger_than_slot_is_refused(updater: Updater, device_dir: Path,
                                             make_bundle: BundleFactory) -> None:
    data = make_bundle("2.0", size=(1 << 20) + 1).read_bytes()
    assert_refused(updater, device_dir, data, PayloadTooLarge, "holds 1048576")


def test_a_refused_authentic_bundle_teaches_the_device_nothing(
        updater: Updater, device_dir: Path, make_bundle: BundleFactory, pki: Keys) -> None:
    """Its signature is good, but the device refuses it (too large): the trusted time and the
    CRL store stay as they were; only an accepted bundle moves them."""
    before = updater.journal.trusted_time
    crl = keys.revoke(pki.root, []).read_bytes()
    data = make_bundle("2.0", size=(1 << 20) + 1, build_time=int(time.time()) + 3600, crl=crl).read_bytes()
    assert_refused(updater, device_dir, data, PayloadTooLarge)
    assert updater.journal.trusted_time == before
    assert not list((updater.cfg.state_dir / "crls").glob("*.crl"))


def test_payload_class_without_slot_is_refused(updater: Updater, device_dir: Path,
                                               make_bundle: BundleFactory) -> None:
    data = make_bundle("2.0", payload_class="bootfw").read_bytes()
    assert_refused(updater, device_dir, data, IncompatibleBundle, "no slot for")


def test_payload_from_another_signed_bundle_is_refused(updater: Updater, device_dir: Path,
                                                       make_bundle: BundleFactory) -> None:
    a = make_bundle("2.0", size=200_000).read_bytes()
    b = make_bundle("2.1", size=200_000).read_bytes()
    ma, mb = members(a), members(b)
    # a's head + b's block list and payload: each part validly signed, but not together
    head_end = ma[3][1]
    mixed = a[:head_end] + b[mb[3][1]:]
    with pytest.raises(HashMismatch, match="block list"):
        install_bytes(updater, mixed)
    # b's block list is fine for b's payload, so keep a's list and swap in b's payload
    mixed2 = a[:ma[4][1]] + b[mb[4][1]:]
    with pytest.raises(HashMismatch):
        install_bytes(updater, mixed2)
    assert updater.journal.state().phase == "idle"


def test_truncation_at_every_section_boundary_is_refused(updater: Updater, device_dir: Path,
                                                         make_bundle: BundleFactory) -> None:
    data = make_bundle("2.0", size=200_000).read_bytes()
    cuts = {0, 100, len(data) - 1024, len(data) - 600}
    for _, off, size in members(data):
        cuts |= {off, off + 100, off + 512, off + 512 + size // 2, off + 512 + size}
    env = (device_dir / "uboot.env").read_bytes()
    for cut in sorted(c for c in cuts if c < len(data) - 1024):
        with pytest.raises(BundleError):
            install_bytes(updater, data[:cut])
        assert (device_dir / "uboot.env").read_bytes() == env
        assert updater.journal.slots()["B"].state == "empty"
        assert updater.journal.state().phase == "idle"
        assert updater.dev.bootloader.primary() == "A"
        assert updater.dev.bootloader.trial() is None


def test_truncated_stream_names_the_problem(updater: Updater, make_bundle: BundleFactory) -> None:
    data = make_bundle("2.0", size=200_000).read_bytes()
    with pytest.raises(TruncatedBundle, match=f"ends early, at byte {len(data) // 2}"):
        install_bytes(updater, data[:len(data) // 2])
    with pytest.raises(TruncatedBundle, match="8 bytes is too short to be an edgeops bundle"):
        install_bytes(updater, b"not one!")


def test_manifest_declaring_far_more_than_follows(updater: Updater, device_dir: Path, pki: Keys,
                                                  tmp_path: Path) -> None:
    img = tmp_path / "small.img"
    img.write_bytes(b"x" * 100_000)
    out = tmp_path / "liar.bundle"
    bundle_writer.create(out, sign=keys.load_signing_key(pki.signer_key).sign,
                  chain_pem=pki.signer_crt.read_bytes(), compatible="edgeops-sim", version="2.0",
                  security_version=1, build_time=int(dt.datetime.now().timestamp()),
                  sources=[bundle_writer.PayloadSource("rootfs", "rootfs", img)])
    data = out.read_bytes()
    # Re-sign a manifest that claims 900 kB (fits the slot) while 100 kB follow.
    d = json.loads(bundle.BundleReader(io.BytesIO(data)).read_head().manifest_bytes)
    d["payloads"][0]["size"] = d["payloads"][0]["stored_size"] = 900_000
    forged = _rebuild(data, json.dumps(d, sort_keys=True, separators=(",", ":")).encode(), pki)
    with pytest.raises(BundleError, match="holds 64 bytes, the manifest says 448"):
        install_bytes(updater, forged)
    assert allocated_blocks(device_dir / "slot-b.img") == 0


def _rebuild(data: bytes, new_manifest: bytes, pki: Keys) -> bytes:
    sig = keys.load_signing_key(pki.signer_key).sign(new_manifest)
    out = io.BytesIO()
    for name, off, size in members(data):
        body = data[off + 512: off + 512 + size]
        if name == "manifest.json":
            body = new_manifest
        elif name == "manifest.sig":
            body = sig
        out.write(tarstream.header(name, len(body), 0) + body + bytes(tarstream.padding(len(body))))
    out.write(tarstream.END)
    return out.getvalue()


def _with_header(data: bytes, index: int, **fields: bytes) -> bytes:
    """Rewrite one member header field by field (offsets of ustar) and fix its checksum."""
    offsets = {"name": (0, 100), "type": (156, 157), "link": (157, 257)}
    off = members(data)[index][1]
    block = bytearray(data[off:off + 512])
    for key, value in fields.items():
        a, b = offsets[key]
        block[a:b] = value.ljust(b - a, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return data[:off] + bytes(block) + data[off + 512:]


@pytest.mark.parametrize("fields, words", [
    ({"name": b"/etc/shadow"}, "absolute or '..'"),
    ({"name": b"../../boot/x"}, "absolute or '..'"),
    ({"type": b"2", "link": b"/dev/sda"}, "symbolic link"),
    ({"type": b"1", "link": b"manifest.json"}, "hard link"),
    ({"type": b"3"}, "character device"),
    ({"type": b"4"}, "block device"),
    ({"type": b"6"}, "FIFO"),
    ({"type": b"x"}, "pax extended header"),
    ({"type": b"L"}, "GNU long-name"),
])
def test_unsafe_tar_members_are_refused(updater: Updater, device_dir: Path,
                                        make_bundle: BundleFactory, fields: dict[str, bytes],
                                        words: str) -> None:
    data = make_bundle("2.0").read_bytes()
    for index in (0, 4):  # in the signed head and in place of the payload
        assert_refused(updater, device_dir, _with_header(data, index, **fields), UnsafeMember, words)


def test_unexpected_extra_member_is_refused(updater: Updater, make_bundle: BundleFactory) -> None:
    data = make_bundle("2.0").read_bytes()
    extra = tarstream.header("evil.sh", 4, 0) + b"boom" + bytes(508)
    with pytest.raises(UnsafeMember, match=r"evil\.sh"):
        install_bytes(updater, data[:-1024] + extra + tarstream.END)


def test_corrupt_tar_header_is_refused(updater: Updater, device_dir: Path,
                                       make_bundle: BundleFactory) -> None:
    data = make_bundle("2.0").read_bytes()
    assert_refused(updater, device_dir, flip(data, 10), BundleError, "checksum")


def test_not_a_bundle_at_all(updater: Updater, device_dir: Path) -> None:
    assert_refused(updater, device_dir, b"\x7fELF" + bytes(2000), BundleError)


def test_a_damaged_crl_in_the_operators_crl_dir_stops_installs(updater: Updater, device_dir: Path,
                                                               make_bundle: BundleFactory) -> None:
    (device_dir / "keyring" / "revoked.crl").write_bytes(b"-----BEGIN X509 CRL-----\ngarbage\n")
    with pytest.raises(ConfigError, match="is not a CRL"):
        install_bytes(updater, make_bundle("2.0").read_bytes())


# --- a trial armed before its signer was revoked or expired ----------------------------------------
def armed_by(updater: Updater, device_dir: Path, make_bundle: BundleFactory, signer: keys.KeyPair) -> None:
    updater.install(io.BytesIO(make_bundle("2.0", signer=by(signer)).read_bytes()))
    assert updater.journal.state().phase == "trial-pending"
    from agent.host import sim

    sim.SimFirmware(device_dir).reboot()
    updater.messages.clear()


def assert_reverted(updater: Updater, words: str) -> None:
    assert updater.journal.state().phase in ("reverting", "idle")
    assert updater.journal.slots()["B"].state == "bad"
    assert updater.journal.security_floor == 0  # a distrusted trial never raises the floor
    rows = [r for r in updater.journal.history(10) if r.event == "distrusted"]
    assert rows and words in rows[-1].detail, updater.journal.history(10)
    assert any(m.startswith("distrusted: slot B 2.0") and words in m for m in updater.messages)


@pytest.mark.parametrize("where", ["crl_dir", "state"])
def test_a_crl_that_arrives_during_a_trial_reverts_it(updater: Updater, device_dir: Path,
                                                     make_bundle: BundleFactory, pki: Keys,
                                                     tmp_path: Path, where: str) -> None:
    """The CRL revoking the trial's signer comes after the trial was armed (the operator's
    crl_dir, or a model bundle that stored it): health passes, the trial is still reverted."""
    victim, (crl,) = revoked_signer(pki, tmp_path / "late")
    armed_by(updater, device_dir, make_bundle, victim)
    store = device_dir / "keyring" if where == "crl_dir" else updater.cfg.state_dir / "crls"
    store.mkdir(parents=True, exist_ok=True)
    (store / "late.crl").write_bytes(crl)
    updater.cycle()
    assert_reverted(updater, "was revoked")
    assert updater.rebooted and updater.dev.runtime.booted_slot() == "A"


def test_a_technician_cannot_commit_a_revoked_trial(updater: Updater, device_dir: Path,
                                                    make_bundle: BundleFactory, pki: Keys,
                                                    tmp_path: Path) -> None:
    victim, (crl,) = revoked_signer(pki, tmp_path / "late2")
    armed_by(updater, device_dir, make_bundle, victim)
    updater.status()  # the boot is noted by the next command, here mark-good's own
    (device_dir / "keyring" / "late.crl").write_bytes(crl)
    updater.mark_good()
    assert_reverted(updater, "was revoked")


def test_a_signer_that_expires_before_the_commit_reverts_the_trial(updater: Updater, device_dir: Path,
                                                                  make_bundle: BundleFactory, pki: Keys,
                                                                  tmp_path: Path) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=12)
    short = keys.issue_signer(pki.root, tmp_path / "short", days=1, not_before=start)
    armed_by(updater, device_dir, make_bundle, short)
    updater.clock = lambda: time.time() + 2 * 86400  # the device was off for two days
    updater.cycle()
    assert_reverted(updater, "expired on")


def test_a_trial_whose_signer_still_holds_commits(updater: Updater, device_dir: Path,
                                                  make_bundle: BundleFactory, pki: Keys,
                                                  tmp_path: Path) -> None:
    _, (crl,) = revoked_signer(pki, tmp_path / "other")  # revokes someone else
    armed_by(updater, device_dir, make_bundle, keys.issue_signer(pki.root, tmp_path / "fine"))
    (device_dir / "keyring" / "other.crl").write_bytes(crl)
    updater.cycle()
    assert updater.journal.slots()["B"].state == "good" and updater.journal.security_floor == 1
