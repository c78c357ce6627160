"""The command-line contract: commands, one-line errors, documented exit codes."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli.main import COMMANDS, EXIT_CODES, GROUPS, group, groups_for, parse_args
from tests.conftest import BundleFactory, Keys, make_image, run_cli
from tests.faultproxy import Fault, FaultProxy


@pytest.fixture
def cfg(device_dir: Path) -> Path:
    return device_dir / "agent.toml"


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("edgeops: error: ")
    return lines[0]


def test_full_cycle_through_the_cli(cfg: Path, make_bundle: BundleFactory) -> None:
    b = make_bundle("2.0")
    out = run_cli("install", b, "--config", cfg, check=True).stdout
    assert "into slot B" in out
    run_cli("sim", "reboot", "--config", cfg, check=True)
    assert "committed" in run_cli("agent", "--once", "--config", cfg, check=True).stdout
    st = json.loads(run_cli("status", "--json", "--config", cfg, check=True).stdout)
    assert (st["booted_slot"], st["primary_slot"], st["trial"]) == ("B", "B", False)
    assert st["slots"]["B"]["version"] == "2.0" and st["slots"]["B"]["state"] == "good"
    hist = json.loads(run_cli("history", "--json", "--config", cfg, check=True).stdout)
    assert [h["event"] for h in hist][-1] == "committed"


def test_install_from_stdin(cfg: Path, make_bundle: BundleFactory) -> None:
    data = make_bundle("2.0").read_bytes()
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "agent.cli", "install", "-", "--config", str(cfg)],
                          input=data, capture_output=True, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **k: object) -> None:
            super().__init__(*a, directory=str(root), **k)  # type: ignore[arg-type]

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            if not self.path.startswith("/nolength/"):
                return super().do_GET()
            # HTTP/1.0, close-delimited: the client cannot know the size or resume
            data = (root / self.path.removeprefix("/nolength/")).read_bytes()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", root
    finally:
        srv.shutdown()


def test_install_from_http(cfg: Path, make_bundle: BundleFactory,
                           http_dir: tuple[str, Path]) -> None:
    url, root = http_dir
    (root / "v2.bundle").write_bytes(make_bundle("2.0").read_bytes())
    run_cli("install", f"{url}/v2.bundle", "--config", cfg, check=True)
    missing = run_cli("install", f"{url}/nope.bundle", "--config", cfg)
    assert missing.returncode == 41  # not found: not "retry later" (40)
    assert "404" in one_line_error(missing.stderr)


@pytest.mark.parametrize("verdict, slot", [("mark-good", "B"), ("mark-bad", "A")])
def test_technician_verdict_reaches_a_running_health_loop(cfg: Path, make_bundle: BundleFactory,
                                                          verdict: str, slot: str) -> None:
    import subprocess
    import sys

    # The app never comes up by itself: the agent would probe for 60 s holding the lock.
    # ... and it waits 45 s between probe rounds: the verdict must not wait for the next round.
    health = {"deadline": 120, "interval": 45, "retries": 100,
              "probe": [{"type": "command", "command": ["false"], "name": "app"}]}
    run_cli("install", make_bundle("2.0", health=health), "--config", cfg, check=True)
    run_cli("sim", "reboot", "--config", cfg, check=True)
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--once", "--config", str(cfg)],
                             cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, text=True)
    try:
        wait_until_locked(cfg.parent / "state" / "lock")
        out = run_cli(verdict, "--config", cfg, check=True).stdout
        assert "handed to the running agent" in out
        assert agent.wait(20) == 0
    finally:
        agent.kill()
    st = json.loads(run_cli("status", "--json", "--config", cfg, check=True).stdout)
    assert st["primary_slot"] == slot and st["trial"] is False
    hist = json.loads(run_cli("history", "--json", "--config", cfg, check=True).stdout)
    assert any("by operator" in (h.get("detail") or "") for h in hist), hist


def wait_until_locked(lock: Path, timeout: float = 20) -> None:
    import fcntl
    import os
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if lock.exists():
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                return
            finally:
                os.close(fd)
        time.sleep(0.05)
    raise AssertionError(f"nobody took {lock}")


def test_install_from_http_resumes_after_a_dropped_connection(
        cfg: Path, make_bundle: BundleFactory, http_dir: tuple[str, Path]) -> None:
    url, root = http_dir
    (root / "v2.bundle").write_bytes(make_bundle("2.0", size=600_000).read_bytes())
    proxy = FaultProxy(_address(url), [Fault("drop", after=200_000), Fault("truncate", after=100_000)],
                       match=b"/v2.bundle")
    try:
        run_cli("install", f"{proxy.url}/v2.bundle", "--config", cfg, check=True)
    finally:
        proxy.close()
    assert len(proxy.applied) == 2
    st = json.loads(run_cli("status", "--json", "--config", cfg, check=True).stdout)
    assert st["slots"]["B"]["version"] == "2.0" and st["trial_pending_slot"] == "B"


def test_install_from_http_broken_for_good_fails_cleanly(
        cfg: Path, make_bundle: BundleFactory, http_dir: tuple[str, Path]) -> None:
    url, root = http_dir
    (root / "v2.bundle").write_bytes(make_bundle("2.0", size=600_000).read_bytes())
    before = json.loads(run_cli("status", "--json", "--config", cfg, check=True).stdout)
    env = (cfg.parent / "uboot.env").read_bytes()
    proxy = FaultProxy(_address(url), [Fault("drop", after=300_000)], match=b"/nolength/")
    try:
        proc = run_cli("install", f"{proxy.url}/nolength/v2.bundle", "--config", cfg)
    finally:
        proxy.close()
    assert proc.returncode == 40, proc.stderr
    assert "broke off" in one_line_error(proc.stderr)
    after = json.loads(run_cli("status", "--json", "--config", cfg, check=True).stdout)
    assert after["phase"] == before["phase"] == "idle"
    assert after["booted_slot"] == before["booted_slot"] and after["trial_pending_slot"] is None
    assert (cfg.parent / "uboot.env").read_bytes() == env
    hist = json.loads(run_cli("history", "--json", "--config", cfg, check=True).stdout)
    assert hist[-1]["event"] == "failed"


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


@pytest.mark.parametrize("kind, code", [
    ("tampered", 15), ("incompatible", 13), ("rollback", 12), ("untrusted", 11), ("garbage", 14),
])
def test_refusals_exit_with_their_documented_code(cfg: Path, make_bundle: BundleFactory,
                                                  tmp_path: Path, pki: Keys, kind: str,
                                                  code: int) -> None:
    run_cli("install", make_bundle("2.0", security_version=3), "--config", cfg, check=True)
    run_cli("sim", "reboot", "--config", cfg, check=True)
    run_cli("agent", "--once", "--config", cfg, check=True)
    def active() -> tuple[object, ...]:
        st = json.loads(run_cli("status", "--json", "--config", cfg, check=True).stdout)
        return st["booted_slot"], st["primary_slot"], st["phase"], st["slots"][st["booted_slot"]]

    before = active()
    env = (cfg.parent / "uboot.env").read_bytes()
    if kind == "tampered":
        data = bytearray(make_bundle("3.0", security_version=3).read_bytes())
        data[-3000] ^= 0xFF
        bad = tmp_path / "bad.bundle"
        bad.write_bytes(bytes(data))
    elif kind == "incompatible":
        bad = make_bundle("3.0", security_version=3, compatible="rpi4")
    elif kind == "rollback":
        bad = make_bundle("1.0", security_version=2)
    elif kind == "untrusted":
        from agent.host import keys

        keys.init_root(tmp_path / "r2")
        kp = keys.issue_signer(tmp_path / "r2", tmp_path / "s2")
        bad = make_bundle("3.0", security_version=3, signer=(kp.key_path, kp.cert_path))
    else:
        bad = tmp_path / "garbage"
        bad.write_bytes(b"hello" * 1000)
    proc = run_cli("install", bad, "--config", cfg)
    assert proc.returncode == code, proc.stderr
    one_line_error(proc.stderr)
    assert active() == before
    assert (cfg.parent / "uboot.env").read_bytes() == env
    hist = json.loads(run_cli("history", "--json", "--config", cfg, check=True).stdout)
    assert hist[-1]["event"] in ("refused", "failed")


def test_missing_config_is_exit_3_with_a_hint(tmp_path: Path) -> None:
    proc = run_cli("status", "--config", tmp_path / "nope.toml")
    assert proc.returncode == 3
    assert "pass --config" in one_line_error(proc.stderr)


def test_usage_errors_exit_2() -> None:
    assert run_cli("install").returncode == 2


def test_exit_codes_are_unique_per_meaning() -> None:
    table = dict(EXIT_CODES)
    assert all(0 < code < 128 for code in table.values())
    assert len(table) == len(EXIT_CODES)


def test_health_command_reports_each_probe(cfg: Path) -> None:
    proc = run_cli("health", "--config", cfg)
    assert proc.returncode == 0 and proc.stdout.startswith("PASS")


def test_bundle_verify_and_info(make_bundle: BundleFactory, pki: Keys) -> None:
    b = make_bundle("2.0", compress=True)
    ok = run_cli("bundle", "verify", b, "--keyring", pki.root_crt, check=True)
    assert "blocks verified" in ok.stdout
    info = json.loads(run_cli("bundle", "info", b, "--json", check=True).stdout)
    assert info["version"] == "2.0" and info["verified"] is False


def test_keys_revoke_then_bundle_carries_the_crl(tmp_path: Path, cfg: Path) -> None:
    root, signer = tmp_path / "root", tmp_path / "signer"
    run_cli("keys", "init-root", "--out", root, check=True)
    run_cli("keys", "issue-signer", "--root", root, "--out", signer, "--days", "30", check=True)
    run_cli("keys", "revoke", "--root", root, "--cert", signer / "signer.crt", check=True)
    img = make_image(tmp_path / "i.img", 10_000, "x")
    b = tmp_path / "r.bundle"
    run_cli("bundle", "create", "--key", signer / "signer.key", "--cert", signer / "signer.crt",
            "--compatible", "edgeops-sim", "--version", "9", "--security-version", "1",
            "--payload", f"rootfs={img}", "--crl", root / "revoked.crl", "-o", b, check=True)
    proc = run_cli("bundle", "verify", b, "--keyring", root / "root.crt")
    assert proc.returncode == 11 and "revoked" in one_line_error(proc.stderr)


def test_keys_init_root_takes_its_directory_as_a_positional(tmp_path: Path) -> None:
    run_cli("keys", "init-root", tmp_path / "root", check=True)  # as the quickstart writes it
    assert (tmp_path / "root" / "root.key").is_file() and (tmp_path / "root" / "root.crt").is_file()


def test_keys_init_root_refuses_two_different_directories(tmp_path: Path) -> None:
    proc = run_cli("keys", "init-root", tmp_path / "a", "--out", tmp_path / "b")
    assert proc.returncode == 2 and "two directories" in one_line_error(proc.stderr)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_keys_init_root_without_a_directory_says_how_to_name_one() -> None:
    proc = run_cli("keys", "init-root")
    assert proc.returncode == 2 and "init-root DIR" in one_line_error(proc.stderr)


def test_sim_init_refuses_an_existing_device(device_dir: Path, pki: Keys, tmp_path: Path) -> None:
    img = make_image(tmp_path / "x.img", 1000, "x")
    proc = run_cli("sim", "init", device_dir, "--image", img, "--keyring", pki.root_crt)
    assert proc.returncode == 3


def test_agent_cycle_skips_while_another_command_holds_the_lock(cfg: Path) -> None:
    import fcntl
    import os

    run_cli("status", "--config", cfg, check=True)  # the state dir exists
    fd = os.open(cfg.parent / "state" / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as 'edgeops install' does
        out = run_cli("agent", "--once", "--config", cfg, check=True).stdout
    finally:
        os.close(fd)
    assert "device busy" in out


def test_version_is_the_package_version() -> None:
    from agent import __version__

    assert run_cli("--version", check=True).stdout.strip() == f"edgeops {__version__}"


def test_status_says_when_the_other_slot_is_below_the_floor(cfg: Path, make_bundle: BundleFactory) -> None:
    run_cli("install", make_bundle("2.0", security_version=1), "--config", cfg, check=True)
    run_cli("sim", "reboot", "--config", cfg, check=True)
    run_cli("agent", "--once", "--config", cfg, check=True)
    out = run_cli("status", "--config", cfg, check=True).stdout
    line_a = next(line for line in out.splitlines() if "slot A" in line)
    assert "no rollback to it" in line_a
    assert run_cli("rollback", "--config", cfg).returncode == 12


def test_the_command_table_names_what_each_group_registers() -> None:
    import argparse

    for name in GROUPS:
        sub = argparse.ArgumentParser().add_subparsers()
        group(name).register(sub)
        assert set(sub.choices) == {w for w, g in COMMANDS.items() if g == name}, name


def test_only_the_chosen_command_group_is_loaded() -> None:
    assert groups_for(["--version"]) == () and groups_for([]) == ()
    assert groups_for(["help", "exit-codes"]) == ()
    assert groups_for(["--config", "status", "-v", "status", "--json"]) == ("device_cmd",)
    assert groups_for(["--config=x.toml", "keys", "init-root"]) == ("keys_cmd",)
    assert groups_for(["--conf", "x.toml", "sim", "reboot"]) == ("sim_cmd",)  # argparse abbreviation
    assert groups_for(["-h"]) == groups_for(["-vh"]) == groups_for(["--help"]) == GROUPS
    assert groups_for(["stauts"]) == GROUPS  # argparse's refusal lists every command
    assert groups_for(None) == GROUPS


def test_a_mistyped_command_lists_the_commands() -> None:
    proc = run_cli("stauts")
    assert proc.returncode == 2
    assert "invalid choice: 'stauts'" in proc.stderr and "'status'" in proc.stderr


def test_config_is_taken_before_or_after_the_command() -> None:
    assert parse_args(["--config", "a.toml", "status"]).config == "a.toml"
    assert parse_args(["--config=a.toml", "status", "--json"]).config == "a.toml"
    assert parse_args(["status", "--config", "b.toml"]).config == "b.toml"
    assert parse_args(["--config", "a.toml", "status", "--config", "b.toml"]).config == "b.toml"
    assert parse_args(["status"]).config is None  # config_path: $EDGEOPS_CONFIG, then the default


def test_without_config_the_environment_then_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.cli.common import config_path
    from agent.core.config import DEFAULT_CONFIG

    monkeypatch.delenv("EDGEOPS_CONFIG", raising=False)
    assert config_path(None) == Path(DEFAULT_CONFIG)
    monkeypatch.setenv("EDGEOPS_CONFIG", "/srv/agent.toml")
    assert config_path(None) == Path("/srv/agent.toml")
    assert config_path("x.toml") == Path("x.toml")


@pytest.mark.parametrize("where", ["before", "before=", "after", "environment"])
def test_status_with_config_before_after_or_from_the_environment(
        cfg: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    args: tuple[str | Path, ...] = {
        "before": ("--config", cfg, "status", "--json"),
        "before=": (f"--config={cfg}", "status", "--json"),
        "after": ("status", "--json", "--config", cfg),
        "environment": ("status", "--json"),
    }[where]
    if where == "environment":
        monkeypatch.setenv("EDGEOPS_CONFIG", str(cfg))
    st = json.loads(run_cli(*args, check=True).stdout)
    assert (st["booted_slot"], st["primary_slot"], st["phase"]) == ("A", "A", "idle")
