"""Trust decisions, pure: chains, expiry at the best-known time, revocation, the clock rule."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import pytest

from agent.adapters import bundle
from agent.core import trust
from agent.errors import SignerExpired, SignerRevoked, UntrustedSigner
from agent.host import keys
from tests.conftest import BundleFactory, Keys

DAY = 86400


def head_of(path: Path) -> bundle.Head:
    return bundle.BundleReader(io.BytesIO(path.read_bytes())).read_head()


def verify(path: Path, pki: Keys, *, now: int, crls: list[bytes] | None = None) -> trust.Verdict:
    h = head_of(path)
    return trust.verify_head(
        manifest_bytes=h.manifest_bytes, signature=h.signature, chain_pem=h.chain_pem,
        keyring=trust.Keyring.from_pem(pki.root_crt.read_bytes()),
        device=trust.DeviceFacts("edgeops-sim", 0, now), crls=crls or [])


def signer_from(pki: Keys, tmp: Path, *, start: dt.datetime, days: int) -> tuple[Path, Path]:
    kp = keys.issue_signer(pki.root, tmp, days=days, not_before=start)
    return kp.key_path, kp.cert_path


def test_best_known_time_is_the_latest_source() -> None:
    assert trust.best_known_time(100.0, 50) == 100
    assert trust.best_known_time(0.0, 50) == 50  # a Pi that booted in 1970


def test_a_clock_wound_back_cannot_revive_an_expired_signer(make_bundle: BundleFactory, pki: Keys,
                                                            tmp_path: Path) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=20)
    signer = signer_from(pki, tmp_path / "s", start=start, days=10)
    b = make_bundle("2.0", signer=signer, build_time=int(start.timestamp()) + DAY)
    journal_time = int(start.timestamp()) + 15 * DAY  # the device once saw a later build
    with pytest.raises(SignerExpired, match="expired on"):
        verify(b, pki, now=trust.best_known_time(0.0, journal_time))


def test_a_device_clock_in_1970_still_accepts_a_fresh_signer(make_bundle: BundleFactory,
                                                             pki: Keys) -> None:
    # No RTC, nothing in the journal yet: "not yet valid" is judged at the signed build time.
    v = verify(make_bundle("2.0"), pki, now=trust.best_known_time(0.0, 0))
    assert v.manifest.version == "2.0"


def test_build_time_outside_the_signer_window_is_refused(make_bundle: BundleFactory,
                                                         pki: Keys) -> None:
    b = make_bundle("2.0", build_time=1_000_000)  # years before the signer existed
    with pytest.raises(UntrustedSigner, match="outside the validity"):
        verify(b, pki, now=0)


def test_verdict_caps_the_time_a_bundle_can_teach(make_bundle: BundleFactory, pki: Keys) -> None:
    v = verify(make_bundle("2.0"), pki, now=0)
    assert v.manifest.build_time <= v.signer_not_after


def test_a_root_cannot_sign_bundles_itself(make_bundle: BundleFactory, pki: Keys) -> None:
    b = make_bundle("2.0", signer=(pki.root / "root.key", pki.root_crt))
    with pytest.raises(UntrustedSigner, match="CA certificate"):
        verify(b, pki, now=0)


def test_a_crl_signed_by_another_root_is_ignored(make_bundle: BundleFactory, pki: Keys,
                                                 tmp_path: Path) -> None:
    keys.init_root(tmp_path / "other")
    serial = keys.cert_serial(pki.signer_crt)
    forged = keys.revoke(tmp_path / "other", [serial]).read_bytes()
    assert verify(make_bundle("2.0"), pki, now=0, crls=[forged]).signer_serial == serial


def test_a_crl_from_the_root_revokes(make_bundle: BundleFactory, pki: Keys, tmp_path: Path) -> None:
    victim = keys.issue_signer(pki.root, tmp_path / "victim")
    crl = keys.revoke(pki.root, [keys.cert_serial(victim.cert_path)]).read_bytes()
    b = make_bundle("2.0", signer=(victim.key_path, victim.cert_path))
    with pytest.raises(SignerRevoked):
        verify(b, pki, now=0, crls=[crl])


def test_garbage_crls_are_ignored_not_fatal(make_bundle: BundleFactory, pki: Keys) -> None:
    assert verify(make_bundle("2.0"), pki, now=0, crls=[b"junk", b"", b"x" * 300_000]).manifest


@pytest.mark.parametrize("chain", [b"", b"not pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                                   b"-----END CERTIFICATE-----\n", b"x" * 20_000])
def test_malformed_signer_chains_are_untrusted(chain: bytes) -> None:
    with pytest.raises(UntrustedSigner):
        trust.parse_chain(chain)


def test_newest_crl_of_a_root_is_kept_whatever_the_order(pki: Keys, tmp_path: Path) -> None:
    keys.init_root(tmp_path / "r")
    blobs = [keys.revoke(tmp_path / "r", []).read_bytes() for _ in range(4)]
    roots = trust.Keyring.from_pem((tmp_path / "r" / "root.crt").read_bytes()).roots
    for order in (blobs, blobs[::-1], [blobs[2], blobs[3], blobs[0], blobs[1]]):
        _, kept = trust.revoked_serials(order, roots)
        assert [k.blob for k in kept] == [blobs[-1]]


def test_two_roots_with_one_name_keep_a_crl_each(tmp_path: Path) -> None:
    # during a root rotation the old and the new root may well share a subject name
    keys.init_root(tmp_path / "r1")
    keys.init_root(tmp_path / "r2")
    roots = trust.Keyring.from_pem((tmp_path / "r1" / "root.crt").read_bytes()
                                   + (tmp_path / "r2" / "root.crt").read_bytes()).roots
    assert roots[0].subject == roots[1].subject
    s1 = keys.issue_signer(tmp_path / "r1", tmp_path / "s1")
    s2 = keys.issue_signer(tmp_path / "r2", tmp_path / "s2")
    for _ in range(3):
        keys.revoke(tmp_path / "r1", [])
    c1 = keys.revoke(tmp_path / "r1", [keys.cert_serial(s1.cert_path)]).read_bytes()  # CRL number 4
    c2 = keys.revoke(tmp_path / "r2", [keys.cert_serial(s2.cert_path)]).read_bytes()  # CRL number 1
    _, kept = trust.revoked_serials([c1, c2], roots)
    assert sorted(k.blob for k in kept) == sorted([c1, c2])
    assert len({k.root_id for k in kept}) == 2
