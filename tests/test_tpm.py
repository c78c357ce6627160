"""The TPM root of trust against a real swtpm on 127.0.0.1 (tests/swtpm.py): never a mock."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

from agent.adapters import rot
from agent.adapters.rot import tpm
from agent.adapters.rot.keystore import KeystoreRoot
from agent.core import anchor, attest, config
from agent.core.anchor import keyring_anchor, sign_rotation
from agent.core.config import ANCHOR_INDEX, COUNTER_INDEX, DEFAULT_PCR, DEVICE_TCTI, TpmSettings
from agent.errors import ConfigError, UntrustedSigner
from agent.host import keys
from tests.conftest import BundleFactory, Keys, run_cli
from tests.swtpm import SwTpm


@pytest.fixture
def swtpm_dev(sw: SwTpm) -> SwTpm:
    return sw  # conftest's swtpm, under the name these tests were written with


def _root(sw: SwTpm, state: Path) -> tpm.TpmRoot:
    return tpm.TpmRoot(TpmSettings(sw.tcti), state)


@pytest.fixture
def evil(tmp_path: Path) -> Path:
    return keys.init_root(tmp_path / "evil", name="edgeops root").cert_path  # same name, other key


def test_provision_anchors_and_write_locks(swtpm_dev: SwTpm, pki: Keys, tmp_path: Path) -> None:
    root = _root(swtpm_dev, tmp_path / "state")
    st = root.provision(pki.root_crt.read_bytes())
    assert st.anchor == keyring_anchor(pki.root_crt.read_bytes()).hex()
    assert st.anchor_locked and st.floor == 0
    assert root.provision(pki.root_crt.read_bytes()) == st  # idempotent
    root.check_keyring(pki.root_crt.read_bytes())


def test_anchor_cannot_be_rewritten_even_by_the_owner(swtpm_dev: SwTpm, pki: Keys, tmp_path: Path,
                                                      evil: Path) -> None:
    import tpm2_pytss as tss  # type: ignore[import-untyped,unused-ignore]

    _root(swtpm_dev, tmp_path / "state").provision(pki.root_crt.read_bytes())
    e = tss.ESAPI(swtpm_dev.tcti)
    try:
        h = e.tr_from_tpmpublic(ANCHOR_INDEX)
        with pytest.raises(tss.TSS2_Exception, match="locked"):
            e.nv_write(h, b"EOA1" + keyring_anchor(evil.read_bytes()) + bytes(8), 0,
                       auth_handle=tss.ESYS_TR.OWNER)
    finally:
        e.close()


def test_forged_keyring_refused(swtpm_dev: SwTpm, pki: Keys, tmp_path: Path, evil: Path) -> None:
    root = _root(swtpm_dev, tmp_path / "state")
    root.provision(pki.root_crt.read_bytes())
    with pytest.raises(rot.KeyringMismatch):
        root.check_keyring(evil.read_bytes())
    # a keyring with the real root plus the thief's is a different set, too
    with pytest.raises(rot.KeyringMismatch):
        root.check_keyring(pki.root_crt.read_bytes() + evil.read_bytes())
    # and re-provisioning cannot replace the anchor
    with pytest.raises(rot.KeyringMismatch):
        root.provision(evil.read_bytes())


def test_unprovisioned_tpm_refuses_checks(swtpm_dev: SwTpm, pki: Keys, tmp_path: Path) -> None:
    root = _root(swtpm_dev, tmp_path / "state")
    with pytest.raises(rot.NotProvisioned):
        root.check_keyring(pki.root_crt.read_bytes())
    with pytest.raises(rot.NotProvisioned):
        root.floor()


def test_counter_monotonic_across_reimage(swtpm_dev: SwTpm, pki: Keys, tmp_path: Path) -> None:
    keyring = pki.root_crt.read_bytes()
    state = tmp_path / "state"
    root = _root(swtpm_dev, state)
    root.provision(keyring)
    assert root.raise_floor(5) == 5
    assert root.raise_floor(3) == 5  # never down
    root.measure("boot:slot", b"a")
    assert (state / "tpm" / "measurements.jsonl").exists()
    # re-image: the agent's files are gone, the TPM (its NV state) is the same chip
    shutil.rmtree(state)
    swtpm_dev.power_cycle()
    again = _root(swtpm_dev, state)
    assert again.provision(keyring).floor == 5
    assert again.floor() == 5
    assert again.raise_floor(6) == 6


def test_recreating_the_counter_cannot_lower_the_floor(swtpm_dev: SwTpm, pki: Keys,
                                                       tmp_path: Path) -> None:
    import tpm2_pytss as tss  # type: ignore[import-untyped,unused-ignore]

    root = _root(swtpm_dev, tmp_path / "state")
    root.provision(pki.root_crt.read_bytes())
    root.raise_floor(7)
    e = tss.ESAPI(swtpm_dev.tcti)
    try:  # an attacker with owner auth deletes the counter
        e.nv_undefine_space(e.tr_from_tpmpublic(COUNTER_INDEX))
    finally:
        e.close()
    assert root.status().counter is None
    assert root.provision(pki.root_crt.read_bytes()).floor is not None
    assert root.floor() >= 7  # a new counter starts at the highest count the TPM ever held


def test_large_floor_jump_is_capped_per_call(swtpm_dev: SwTpm, pki: Keys, tmp_path: Path) -> None:
    root = _root(swtpm_dev, tmp_path / "state")
    root.provision(pki.root_crt.read_bytes())
    assert root.raise_floor(10_000) == tpm.MAX_FLOOR_STEP


def test_quote_verified_and_replay_refused(swtpm_dev: SwTpm, pki: Keys, tmp_path: Path) -> None:
    root = _root(swtpm_dev, tmp_path / "state")
    root.provision(pki.root_crt.read_bytes())
    image = hashlib.sha256(b"rootfs v2").digest()
    root.measure("install:rootfs:b", image)
    root.measure("boot:slot", b"b")
    ak = root.ak_public_pem()
    nonce = bytes.fromhex("00112233445566778899aabbccddeeff")
    q = rot.Quote.from_json(root.quote(nonce).to_json())
    assert q.ak_public_pem == ak  # the same key comes back: derived, not stored
    assert [e.label for e in q.events] == ["install:rootfs:b", "boot:slot"]
    expected = attest.expected_digest(q.events, [DEFAULT_PCR])
    facts = attest.verify_quote(ak_public_pem=ak, attest=q.attest, signature=q.signature, nonce=nonce,
                                expected_pcrs=[DEFAULT_PCR], expected_pcr_digest=expected)
    assert facts.pcrs == (DEFAULT_PCR,)
    # replay: the controller's next challenge has a new nonce
    with pytest.raises(attest.QuoteRefused, match="nonce"):
        attest.verify_quote(ak_public_pem=ak, attest=q.attest, signature=q.signature,
                            nonce=b"\x01" * 16, expected_pcrs=[DEFAULT_PCR],
                            expected_pcr_digest=expected)
    # altered: a quote with the digest of a different image
    forged_events = (attest.Event(DEFAULT_PCR, "install:rootfs:b", b"\x00" * 32), q.events[1])
    with pytest.raises(attest.QuoteRefused, match="PCR"):
        attest.verify_quote(ak_public_pem=ak, attest=q.attest, signature=q.signature, nonce=nonce,
                            expected_pcrs=[DEFAULT_PCR],
                            expected_pcr_digest=attest.expected_digest(forged_events, [DEFAULT_PCR]))
    tampered = bytearray(q.attest)
    tampered[-1] ^= 1
    with pytest.raises(attest.QuoteRefused, match="signature"):
        attest.verify_quote(ak_public_pem=ak, attest=bytes(tampered), signature=q.signature,
                            nonce=nonce, expected_pcrs=[DEFAULT_PCR], expected_pcr_digest=expected)


def test_reboot_resets_measurements(swtpm_dev: SwTpm, pki: Keys, tmp_path: Path) -> None:
    state = tmp_path / "state"
    root = _root(swtpm_dev, state)
    root.provision(pki.root_crt.read_bytes())
    root.measure("boot:slot", b"a")
    swtpm_dev.power_cycle()  # PCRs back to zero, event log file still on disk
    root = _root(swtpm_dev, state)
    assert root.status().measurements == 0
    root.measure("boot:slot", b"b", once=True)
    root.measure("boot:slot", b"b", once=True)  # a second agent cycle in the same boot
    q = root.quote(b"n" * 16)
    attest.verify_quote(ak_public_pem=q.ak_public_pem, attest=q.attest, signature=q.signature,
                        nonce=b"n" * 16, expected_pcrs=[DEFAULT_PCR],
                        expected_pcr_digest=attest.expected_digest(q.events, [DEFAULT_PCR]))
    assert len(q.events) == 1


def test_sealed_secret_only_unseals_on_its_tpm(swtpm_dev: SwTpm, tmp_path: Path) -> None:
    state = tmp_path / "state"
    root = _root(swtpm_dev, state)
    root.seal("identity_key", b"not on disk in clear")
    blob = (state / "tpm" / "identity_key.sealed").read_bytes()
    assert b"not on disk in clear" not in blob
    assert root.unseal("identity_key") == b"not on disk in clear"
    other = SwTpm(tmp_path / "other-tpm").start()
    try:
        with pytest.raises(rot.TpmError):
            _root(other, state).unseal("identity_key")
    finally:
        other.stop()


def test_root_rotation(swtpm_dev: SwTpm, pki: Keys, tmp_path: Path, evil: Path) -> None:
    old = pki.root_crt.read_bytes()
    new_root = keys.init_root(tmp_path / "newroot", name="edgeops root 2")
    new = old + new_root.cert_path.read_bytes()  # overlap: both roots trusted during the switch
    root_key, _ = keys.load_root(pki.root)
    root = _root(swtpm_dev, tmp_path / "state")
    root.provision(old)
    evil_key, _ = keys.load_root(evil.parent)
    with pytest.raises(UntrustedSigner):
        root.rotate_keyring(old, evil.read_bytes(), sign_rotation(evil_key, evil.read_bytes()))
    sig = sign_rotation(root_key, new)
    root.rotate_keyring(old, new, sig)
    root.check_keyring(new)
    with pytest.raises(rot.KeyringMismatch):
        root.check_keyring(old)
    root.rotate_keyring(old, new, sig)  # a retry after a crash is harmless
    assert root.status().anchor_locked


def test_required_tpm_has_no_fallback(tmp_path: Path) -> None:
    settings = TpmSettings("swtpm:host=127.0.0.1,port=1", required=True)
    with pytest.raises(rot.TpmRequired):
        rot.open_root(settings, tmp_path)
    with pytest.raises(rot.TpmRequired):
        rot.open_root(TpmSettings(None, required=True), tmp_path)


def test_fallback_to_keystore_warns_once(tmp_path: Path, pki: Keys,
                                         caplog: pytest.LogCaptureFixture) -> None:
    import agent.adapters.rot.keystore as ks

    ks._warned = False
    with caplog.at_level(logging.WARNING):
        a = rot.open_root(TpmSettings("swtpm:host=127.0.0.1,port=1"), tmp_path / "s")
        rot.open_root(TpmSettings(None), tmp_path / "s")
    assert isinstance(a, KeystoreRoot)
    warnings = [r for r in caplog.records if "no TPM" in r.getMessage()]
    assert len(warnings) == 1
    a.provision(pki.root_crt.read_bytes())
    key_file = tmp_path / "s" / "keystore" / "ak.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert a.raise_floor(4) == 4 and a.raise_floor(2) == 4


def test_settings_parsed_from_device_table(tmp_path: Path) -> None:
    s = config.tpm_settings_from_toml('[device]\ntpm_tcti = "device:/dev/tpmrm0"\ntpm_required = true\n',
                                      tmp_path / "a.toml")
    assert s == TpmSettings("device:/dev/tpmrm0", required=True)
    with pytest.raises(Exception, match="PCR"):
        config.tpm_settings_from_toml("[device]\ntpm_pcr = 16\n", tmp_path / "a.toml")


def test_cli_provision_status_quote(swtpm_dev: SwTpm, device_dir: Path) -> None:
    cfg = device_dir / "agent.toml"
    text = cfg.read_text()
    assert "[device]\n" in text
    cfg.write_text(text.replace("[device]\n", f'[device]\ntpm_tcti = "{swtpm_dev.tcti}"\n', 1))
    out = run_cli("tpm", "provision", "--config", cfg, "--device-id", "gw-1", check=True).stdout
    assert "anchored in the TPM" in out
    status = run_cli("tpm", "status", "--config", cfg, check=True).stdout
    assert "write-locked" in status and "matches" in status and "security_version 0" in status
    assert "Identity certificate: none yet" in status
    doc = json.loads(run_cli("tpm", "status", "--config", cfg, "--json", check=True).stdout)
    assert doc["kind"] == "tpm" and doc["keyring_matches"] is True
    q = rot.Quote.from_json(run_cli("tpm", "quote", "--config", cfg, "--nonce", "ab" * 16,
                                    check=True).stdout)
    attest.verify_quote(ak_public_pem=q.ak_public_pem, attest=q.attest, signature=q.signature,
                        nonce=b"\xab" * 16, expected_pcrs=[DEFAULT_PCR],
                        expected_pcr_digest=attest.expected_digest(q.events, [DEFAULT_PCR]))
    bad = run_cli("tpm", "quote", "--config", cfg, "--nonce", "zz")
    assert bad.returncode == 2


def test_root_for_updater_is_off_unless_opted_in(tmp_path: Path, pki: Keys) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[device]\ncompatible = 'x'\n")
    assert rot.root_for_updater(rot.load_settings(cfg), tmp_path / "state") is None
    KeystoreRoot(tmp_path / "state", reason="test").provision(pki.root_crt.read_bytes())
    found = rot.root_for_updater(rot.load_settings(cfg), tmp_path / "state")
    assert isinstance(found, KeystoreRoot)
    found.check_keyring(pki.root_crt.read_bytes())
    cfg.write_text("[device]\ntpm_required = true\n")
    with pytest.raises(rot.TpmRequired):
        rot.root_for_updater(rot.load_settings(cfg), tmp_path / "state")


def test_updater_uses_the_tpm(swtpm_dev: SwTpm, device_dir: Path, make_bundle: BundleFactory,
                              pki: Keys, evil: Path) -> None:
    from agent.core.config import load
    from agent.device.updater import Updater, open_device
    from agent.errors import RollbackRefused
    from agent.host import sim

    if not hasattr(Updater, "root"):
        pytest.skip("the updater hook (docs/tpm.md, 'Updater hook') is not applied yet")
    cfg_path = device_dir / "agent.toml"
    cfg_path.write_text(cfg_path.read_text().replace(
        "[device]\n", f'[device]\ntpm_tcti = "{swtpm_dev.tcti}"\n', 1))
    cfg = load(cfg_path)
    keyring = cfg.keyring.read_bytes()
    tpm.TpmRoot(cfg.tpm, cfg.state_dir).provision(keyring)

    def updater() -> Updater:
        return Updater(open_device(load(cfg_path)), sleep=lambda s: None)

    up = updater()
    with open(make_bundle("2.0", security_version=3), "rb") as f:
        up.install(f)
    sim.SimFirmware(device_dir).reboot()
    up.cycle()
    assert up.status()["phase"] == "idle" and up.journal.security_floor == 3
    root = up.root()  # type: ignore[attr-defined,unused-ignore]  # until the hook is applied
    assert root is not None and root.floor() == 3
    labels = [e.label for e in root.quote(b"n" * 16).events]
    assert "boot:slot" in labels
    # a thief swaps the keyring file for one holding their own root: refused before verification
    cfg.keyring.write_bytes(evil.read_bytes())
    with pytest.raises(rot.KeyringMismatch), open(make_bundle("3.0", security_version=4), "rb") as f:
        up.install(f)
    cfg.keyring.write_bytes(keyring)
    # re-image: the journal (and its floor) is gone, the TPM's counter is not
    up.dev.close()
    cfg.journal_path.unlink()
    up = updater()
    with pytest.raises(RollbackRefused), open(make_bundle("1.5", security_version=2), "rb") as f:
        up.install(f)
    up.dev.close()


# --- the pure parts: agent.core.anchor and the [tpm] section of agent.core.config ---------------
def test_keyring_anchor_ignores_order_comments_and_line_endings(pki: Keys, evil: Path) -> None:
    a, b = pki.root_crt.read_bytes(), evil.read_bytes()
    assert keyring_anchor(a + b) == keyring_anchor(b + a)
    assert keyring_anchor(b"# the fleet roots\n" + a.replace(b"\n", b"\r\n")) == keyring_anchor(a)
    assert keyring_anchor(a) != keyring_anchor(a + b) != keyring_anchor(b)
    with pytest.raises(UntrustedSigner):
        keyring_anchor(b"not a certificate")


def test_rotation_signature_binds_the_new_set(pki: Keys, evil: Path) -> None:
    old, new = pki.root_crt.read_bytes(), pki.root_crt.read_bytes() + evil.read_bytes()
    root_key, _ = keys.load_root(pki.root)
    sig = sign_rotation(root_key, new)
    assert anchor.verify_rotation(old, new, sig) == keyring_anchor(new)
    with pytest.raises(UntrustedSigner):
        anchor.verify_rotation(old, evil.read_bytes(), sig)  # the signature is for another set
    with pytest.raises(UntrustedSigner):
        anchor.verify_rotation(evil.read_bytes(), new, sig)  # signed by a root not in the current set


def test_anchor_record_round_trip_and_foreign_data() -> None:
    record = anchor.AnchorRecord(bytes(range(32)), 41)
    data = record.to_bytes()
    assert len(data) == anchor.RECORD_SIZE and data.startswith(b"EOA1")
    assert anchor.AnchorRecord.from_bytes(data) == record
    for foreign in (bytes(anchor.RECORD_SIZE), b"EOA2" + data[4:], data[:-1]):
        with pytest.raises(ValueError):
            anchor.AnchorRecord.from_bytes(foreign)
    with pytest.raises(ValueError):
        anchor.AnchorRecord(b"short", 0).to_bytes()


@pytest.mark.parametrize(("text", "want"), [
    ("", TpmSettings()),
    ('[tpm]\ntcti = "device:/dev/tpmrm0"\nrequired = true\npcr = 17\n',
     TpmSettings("device:/dev/tpmrm0", required=True, pcr=17)),
    ('[device]\ntpm_tcti = "a"\n[tpm]\ntcti = "b"\n', TpmSettings("b")),  # [tpm] wins
    ("[tpm]\nanchor_index = 0x01000F00\ncounter_index = 0x01000F01\n",
     TpmSettings(anchor_index=0x01000F00, counter_index=0x01000F01)),
])
def test_tpm_settings_table(text: str, want: TpmSettings, tmp_path: Path) -> None:
    assert config.tpm_settings_from_toml(text, tmp_path / "a.toml") == want


@pytest.mark.parametrize("text", [
    '[tpm]\ntcti = ""\n', "[tpm]\ntcti = 3\n", '[tpm]\nrequired = "yes"\n', "[tpm]\npcr = 23\n",
    "[tpm]\npcr = true\n", '[tpm]\nanchor_index = "0x01000E00"\n', "[tpm]\ncounter_index = -1\n",
    "tpm = 1\n", "[tpm\n",
])
def test_tpm_settings_refused(text: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        config.tpm_settings_from_toml(text, tmp_path / "a.toml")


def test_agent_config_carries_the_tpm_section(device_dir: Path) -> None:
    path = device_dir / "agent.toml"
    text = path.read_text()
    assert config.parse(text, path).tpm == TpmSettings()
    parsed = config.parse(text + f'\n[tpm]\ntcti = "{DEVICE_TCTI}"\nrequired = true\n', path)
    assert parsed.tpm == TpmSettings(DEVICE_TCTI, required=True)
    with pytest.raises(ConfigError, match="PCR"):
        config.parse(text + "\n[tpm]\npcr = 16\n", path)
