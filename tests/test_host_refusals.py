"""Host tools refuse what no device would accept, in one line, before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

from agent.host import keys
from tests.conftest import Keys, run_cli


def _create(pki: Keys, tmp_path: Path, *, key: Path, cert: Path, out: Path) -> tuple[int, str]:
    image = tmp_path / "rootfs.img"
    image.write_bytes(os.urandom(8192))
    proc = run_cli("bundle", "create", "--key", key, "--cert", cert, "--compatible", "c",
                   "--version", "1", "--security-version", "1", "--payload", f"rootfs={image}",
                   "--output", out, check=False)
    return proc.returncode, proc.stderr


def test_bundle_create_refuses_a_key_that_is_not_the_certificates(pki: Keys, tmp_path: Path) -> None:
    other = keys.issue_signer(pki.root, tmp_path / "other")
    out = tmp_path / "b.bundle"
    code, err = _create(pki, tmp_path, key=other.key_path, cert=pki.signer_crt, out=out)
    assert code == 3 and "does not match" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bundle_create_refuses_the_root_as_signer(pki: Keys, tmp_path: Path) -> None:
    out = tmp_path / "b.bundle"
    code, err = _create(pki, tmp_path, key=pki.root / "root.key", cert=pki.root_crt, out=out)
    assert code == 3 and "CA certificate" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bundle_create_into_an_unwritable_place_is_one_line(pki: Keys, tmp_path: Path) -> None:
    out = tmp_path / "no-such-dir" / "b.bundle"
    code, err = _create(pki, tmp_path, key=pki.signer_key, cert=pki.signer_crt, out=out)
    assert code == 3 and "cannot write the bundle" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_keys_revoke_refuses_the_root_itself(tmp_path: Path) -> None:
    root = keys.init_root(tmp_path / "root")  # its own root: a wrong answer must not spoil the shared one
    proc = run_cli("keys", "revoke", "--root", root.key_path.parent, "--cert", root.cert_path, check=False)
    assert proc.returncode == 3 and "cannot revoke itself" in proc.stderr
    assert not (root.key_path.parent / "revoked.crl").exists()


def test_issue_signer_refuses_a_life_beyond_the_roots(tmp_path: Path) -> None:
    root = keys.init_root(tmp_path / "root", days=10)
    proc = run_cli("keys", "issue-signer", "--root", root.key_path.parent, "--out", tmp_path / "s",
                   "--days", "30", check=False)
    assert proc.returncode == 3 and "outlive its root" in proc.stderr
    assert not (tmp_path / "s" / "signer.key").exists()


def test_keys_init_root_into_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_cli("keys", "init-root", "--out", blocker / "root", check=False)
    assert proc.returncode == 3 and "cannot write the root" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
