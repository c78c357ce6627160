"""agent.core.signer and lifecycle.SignerDistrusted: a trial's second look at its signer."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from agent.core import lifecycle as lc
from agent.core import signer, trust
from agent.host import keys
from tests.conftest import Keys

NOW = int(dt.datetime.now(dt.UTC).timestamp())


@pytest.fixture
def setup(pki: Keys, tmp_path: Path) -> tuple[trust.Keyring, signer.SignerRecord, bytes, bytes]:
    ring = trust.Keyring.from_pem(pki.root_crt.read_bytes())
    victim = keys.issue_signer(pki.root, tmp_path / "victim", days=10)
    rec = signer.record_of(victim.cert_path.read_bytes(), ring)
    other = keys.revoke(pki.root, []).read_bytes()  # first: the root's CRLs are cumulative
    revoking = keys.revoke(pki.root, [keys.cert_serial(victim.cert_path)]).read_bytes()
    return ring, rec, revoking, other


def test_the_record_round_trips(setup: tuple[trust.Keyring, signer.SignerRecord, bytes, bytes]) -> None:
    _, rec, _, _ = setup
    assert signer.SignerRecord.from_dict(rec.to_dict()) == rec
    assert len(rec.path) == 1 and rec.not_after > NOW


@pytest.mark.parametrize("crls, when, words", [
    ("none", NOW, None),
    ("other", NOW, None),
    ("revoking", NOW, "was revoked"),
    ("none", NOW + 11 * 86400, "expired on"),
    ("revoking", NOW + 11 * 86400, "was revoked"),  # revocation is named first
])
def test_distrust(setup: tuple[trust.Keyring, signer.SignerRecord, bytes, bytes], crls: str, when: int,
                  words: str | None) -> None:
    ring, rec, revoking, other = setup
    blobs = {"none": [], "other": [other], "revoking": [other, revoking]}[crls]
    why = signer.distrust(rec, crls=blobs, keyring=ring, best_known_time=when)
    assert (why is None) if words is None else (why is not None and words in why)


def test_a_crl_signed_by_no_trusted_root_revokes_nothing(setup: tuple[trust.Keyring, signer.SignerRecord,
                                                                      bytes, bytes], tmp_path: Path) -> None:
    ring, rec, _, _ = setup
    keys.init_root(tmp_path / "rogue")
    forged = keys.revoke(tmp_path / "rogue", [rec.path[0][1]]).read_bytes()
    assert signer.distrust(rec, crls=[forged], keyring=ring, best_known_time=NOW) is None


def test_a_distrusted_trial_reverts_like_a_failed_health_check() -> None:
    testing = lc.State(lc.Phase.TESTING, "B", "A", "2.0", 1, "b1", 1)
    t = lc.step(testing, lc.SignerDistrusted("its signer was revoked"))
    failed = lc.step(testing, lc.HealthFailed("x"))
    assert t.state == failed.state and [type(a) for a in t.actions] == [type(a) for a in failed.actions]
    assert lc.SlotRecord("B", "bad", "2.0", 1) in t.records
    assert not any(isinstance(r, lc.RaiseFloor) for r in t.records)
    with pytest.raises(lc.IllegalTransition):
        lc.step(lc.State(lc.Phase.COMMITTING, "B", "A", "2.0", 1, "b1", 1), lc.SignerDistrusted("late"))
