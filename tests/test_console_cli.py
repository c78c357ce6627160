"""The console's command line: set-pin, issue-technician and answer, and their refusals as one
line and a documented exit code."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Keys, run_cli


def test_set_pin_stores_only_a_slow_hash_mode_0600(device_dir: Path) -> None:
    proc = run_cli("console", "set-pin", "--pin-stdin", "--config", device_dir / "agent.toml",
                   input=b"580246\n", check=True)
    path = device_dir / "state" / "console" / "pin"
    assert str(path) in proc.stdout
    assert path.stat().st_mode & 0o777 == 0o600 and b"580246" not in path.read_bytes()


def test_a_weak_pin_is_refused_with_a_usage_error(device_dir: Path) -> None:
    proc = run_cli("console", "set-pin", "--pin-stdin", "--config", device_dir / "agent.toml",
                   input=b"123456\n")
    assert proc.returncode == 2 and "plain run" in proc.stderr and "Traceback" not in proc.stderr
    assert not (device_dir / "state" / "console" / "pin").exists()


def test_the_host_tool_answers_and_refuses_what_is_not_a_challenge(pki: Keys, tmp_path: Path) -> None:
    run_cli("console", "issue-technician", "--root", pki.root, "--out", tmp_path / "t",
            "--name", "carol", check=True)
    key, crt = tmp_path / "t" / "technician.key", tmp_path / "t" / "technician.crt"
    ok = run_cli("console", "answer", "edgeops-console-v1 gw-1 " + "ab" * 16 + " 1900000000",
                 "--key", key, "--cert", crt, check=True)
    assert ok.stdout.startswith("v1.") and len(ok.stdout.strip()) < 4096  # fits a tty line
    bad = run_cli("console", "answer", "please sign me", "--key", key, "--cert", crt)
    assert bad.returncode == 11 and "not a console challenge" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_bundle_signer_key_cannot_answer(pki: Keys) -> None:
    proc = run_cli("console", "answer", "edgeops-console-v1 gw-1 " + "ab" * 16 + " 1900000000",
                   "--key", pki.signer_key, "--cert", pki.signer_crt)
    assert proc.returncode == 11 and "not a technician certificate" in proc.stderr


def test_the_console_without_a_config_is_one_config_error(tmp_path: Path) -> None:
    proc = run_cli("console", "--config", tmp_path / "missing.toml")
    assert proc.returncode == 3 and "cannot read config" in proc.stderr
