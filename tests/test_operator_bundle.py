"""bundle info and verify for an operator (issue 13, item 11): health overrides and a carried
CRL shown, the CRLs beside the root applied by default, serials printed as openssl prints them.

Keys, revocation and bundles are made by the real ``edgeops`` commands; serials are compared
with the real ``openssl`` (Debian package openssl).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BundleFactory, make_image, run_cli

HEALTH = {"deadline": 300, "probe": [{"type": "http", "name": "api v2",
                                      "url": "http://127.0.0.1:8080/v2/health"}]}


@pytest.fixture
def revoked(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(root dir, signer dir, a bundle signed by that signer), the signer revoked afterwards
    ('keys revoke' writes ROOT/revoked.crl, beside root.crt)."""
    root, signer = tmp_path / "root", tmp_path / "signer"
    run_cli("keys", "init-root", "--out", root, check=True)
    run_cli("keys", "issue-signer", "--root", root, "--out", signer, "--days", "30", check=True)
    img = make_image(tmp_path / "i.img", 10_000, "x")
    b = tmp_path / "r.bundle"
    run_cli("bundle", "create", "--key", signer / "signer.key", "--cert", signer / "signer.crt",
            "--compatible", "edgeops-sim", "--version", "9", "--security-version", "1",
            "--payload", f"rootfs={img}", "-o", b, check=True)
    run_cli("keys", "revoke", "--root", root, "--cert", signer / "signer.crt", check=True)
    assert (root / "revoked.crl").is_file()
    return root, signer, b


def test_verify_applies_the_crls_beside_the_root_by_default(revoked: tuple[Path, Path, Path]) -> None:
    root, _, b = revoked
    proc = run_cli("bundle", "verify", b, "--keyring", root / "root.crt")
    assert proc.returncode == 11, proc.stdout + proc.stderr
    assert "revoked" in proc.stderr


def test_verify_with_an_explicit_crl_list_uses_only_those(revoked: tuple[Path, Path, Path],
                                                         tmp_path: Path) -> None:
    root, _, b = revoked
    elsewhere = tmp_path / "keyring"
    elsewhere.mkdir()
    shutil.copy(root / "root.crt", elsewhere / "root.crt")  # no CRL beside this copy
    ok = run_cli("bundle", "verify", b, "--keyring", elsewhere / "root.crt", check=True)
    assert "no CRL" in ok.stdout
    proc = run_cli("bundle", "verify", b, "--keyring", elsewhere / "root.crt", "--crl", root / "revoked.crl")
    assert proc.returncode == 11


def _openssl_serial(cert: Path) -> str:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl (Debian package openssl)")
    out = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(cert)], check=True,
                         capture_output=True, text=True).stdout.strip()
    return out.removeprefix("serial=")


def test_info_prints_the_signer_serial_as_openssl_does(make_bundle: BundleFactory, pki) -> None:
    info = json.loads(run_cli("bundle", "info", make_bundle("2.0", size=4096), "--json", check=True).stdout)
    assert info["signer"]["serial"] == _openssl_serial(pki.signer_crt)


def test_info_shows_the_carried_crl_and_its_serials(revoked: tuple[Path, Path, Path], tmp_path: Path,
                                                   make_bundle: BundleFactory) -> None:
    root, signer, _ = revoked
    b = make_bundle("3.0", size=4096, crl=(root / "revoked.crl").read_bytes())
    text = run_cli("bundle", "info", b, check=True).stdout
    line = next(x for x in text.splitlines() if x.startswith("crl"))
    assert _openssl_serial(signer / "signer.crt") in line, line
    info = json.loads(run_cli("bundle", "info", b, "--json", check=True).stdout)
    assert info["crl"]["revoked"] == [_openssl_serial(signer / "signer.crt")]


def test_info_shows_health_overrides(make_bundle: BundleFactory) -> None:
    text = run_cli("bundle", "info", make_bundle("2.0", size=4096, health=HEALTH), check=True).stdout
    assert "deadline 300" in text and "adds 1 probe(s)" in text
    assert "probe http 'api v2'" in text and "http://127.0.0.1:8080/v2/health" in text
    plain = run_cli("bundle", "info", make_bundle("2.1", size=4096), check=True).stdout
    assert "no overrides" in plain and "none carried" in plain
