"""The console as a technician meets it: a real pty (pexpect), a sim device, transcripts kept.

Each test's whole session is saved under build/console-transcripts/ (the test's name), so
what a dumb 80x24 terminal showed can be read after the run."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core.config import load
from agent.device import console
from agent.host import technician
from tests.conftest import BundleFactory, Keys, make_image, run_cli

pexpect = pytest.importorskip("pexpect", reason="pip install pexpect (the test extra)")

REPO = Path(__file__).resolve().parent.parent
TRANSCRIPTS = REPO / "build" / "console-transcripts"
PIN = "246813"
CHALLENGE = re.compile(r"(edgeops-console-v1 \S+ [0-9a-f]{32} \d+)")


@pytest.fixture
def transcript(request: pytest.FixtureRequest) -> Iterator[Path]:
    TRANSCRIPTS.mkdir(parents=True, exist_ok=True)
    path = TRANSCRIPTS / f"{request.node.name}.txt"
    yield path


def spawn(device_dir: Path, transcript: Path, *, term: str = "dumb") -> pexpect.spawn:
    env = {**os.environ, "TERM": term, "PYTHONPATH": str(REPO)}
    env.pop("NO_COLOR", None)
    log = open(transcript, "a", encoding="utf-8")  # noqa: SIM115 (closed with the child)
    log.write(f"\n===== edgeops console (TERM={term}) =====\n")
    child = pexpect.spawn(sys.executable, ["-m", "agent.cli", "console", "--config",
                                           str(device_dir / "agent.toml")],
                          env=env, encoding="utf-8", timeout=20, dimensions=(24, 80))
    child.logfile_read = log
    child.expect("'help' lists commands")
    return child


def login_pin(child: pexpect.spawn, pin: str = PIN) -> None:
    child.sendline("login")
    child.expect("PIN: ")
    child.sendline(pin)


@pytest.fixture
def pinned(device_dir: Path) -> Path:
    console.set_pin(load(device_dir / "agent.toml"), PIN)
    return device_dir


def history(device_dir: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(device_dir / "state" / "journal.db")
    try:
        return [(e, d.split(" tty=")[0]) for e, d in
                db.execute("SELECT event, detail FROM history ORDER BY id")]
    finally:
        db.close()


def outbox(device_dir: Path) -> list[dict[str, object]]:
    db = sqlite3.connect(device_dir / "state" / "journal.db")
    try:
        return [json.loads(b) for (b,) in db.execute(
            "SELECT body FROM outbox WHERE kind='console-audit' ORDER BY id")]
    finally:
        db.close()


def test_a_dumb_terminal_gets_plain_lines_without_escape_sequences(pinned: Path, transcript: Path) -> None:
    child = spawn(pinned, transcript)
    login_pin(child)
    child.expect(r"logged in \(pin\)")
    child.sendline("status")
    child.expect("phase     idle")
    child.sendline("help")
    child.expect(r"help COMMAND' for more\)")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    text = transcript.read_text()
    assert "\x1b" not in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_a_terminal_that_allows_it_gets_tab_completion_and_colour(pinned: Path, transcript: Path) -> None:
    child = spawn(pinned, transcript, term="xterm")
    login_pin(child)
    child.expect("logged in")
    child.send("hea\t")
    child.expect("health ")
    child.sendline("")
    child.expect("checks passed")
    child.expect(r"\x1b\[32mhealthy")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    assert "\x1b[?2004h" not in transcript.read_text()  # no bracketed-paste junk at each prompt


def test_a_vt220_as_the_serial_unit_assumes_gets_line_editing_but_no_colour(
        pinned: Path, transcript: Path) -> None:
    child = spawn(pinned, transcript, term="vt220")
    login_pin(child)
    child.expect("logged in")
    child.send("sl\t")
    child.expect("slots ")
    child.sendline("")
    child.expect(r"\* A    good")
    child.sendline("health")
    child.expect("healthy")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    assert "\x1b[3" not in transcript.read_text()


def test_without_a_login_state_changes_and_reads_are_refused(pinned: Path, transcript: Path) -> None:
    child = spawn(pinned, transcript)
    child.sendline("rollback")
    child.expect("'rollback' needs a login")
    child.sendline("status")
    child.expect("'status' needs a login")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    assert ("console-command", "who=- via=- cmd=rollback outcome=refused: not logged in") in history(pinned)


def test_a_board_that_opens_read_only_commands_still_guards_state_changes(
        pinned: Path, transcript: Path) -> None:
    with open(pinned / "agent.toml", "a") as f:
        f.write("\n[console]\nopen_read_only = true\n")
    child = spawn(pinned, transcript)
    child.sendline("status")
    child.expect("phase     idle")
    child.sendline("reboot")
    child.expect("'reboot' needs a login")
    child.sendline("exit")
    child.expect(pexpect.EOF)


def test_a_pin_login_is_audited_in_the_journal_and_the_outbox(pinned: Path, transcript: Path) -> None:
    child = spawn(pinned, transcript)
    login_pin(child)
    child.expect(r"logged in \(pin\)")
    child.sendline("logout")
    child.expect("logged out")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    events = [e for e, _ in history(pinned)]
    assert events[-2:] == ["console-login", "console-logout"]
    assert [b["event"] for b in outbox(pinned)] == ["login", "logout"]
    assert PIN not in transcript.read_text()  # not echoed


def test_wrong_pins_lock_the_console_and_the_lockout_survives_a_restart(
        pinned: Path, transcript: Path) -> None:
    child = spawn(pinned, transcript)
    for _ in range(2):
        login_pin(child, "999999")
        child.expect("login failed: wrong PIN")
    login_pin(child, "999999")
    # the lockout is 30 s from the third failure; the console shows what is left of it, which
    # a slow scrypt (a loaded machine) has already eaten into
    child.expect(r"3 failed logins: locked for (\d+) s")
    assert 20 <= int(child.match.group(1)) <= 30
    child.sendline("exit")
    child.expect(pexpect.EOF)
    again = spawn(pinned, transcript)
    again.sendline("login")  # even the right PIN is not asked for while locked
    again.expect(r"locked after 3 failed logins: try again in \d+ s")
    again.sendline("exit")
    again.expect(pexpect.EOF)
    events = [e for e, _ in history(pinned)]
    assert events.count("console-login-failed") == 3 and events.count("console-locked-out") == 1
    assert "console-login" not in events
    assert (pinned / "state" / "console" / "lockout.json").stat().st_mode & 0o777 == 0o600


def test_a_signed_challenge_logs_a_technician_in(device_dir: Path, pki: Keys, transcript: Path,
                                                 tmp_path: Path) -> None:
    tech = technician.issue_technician(pki.root, tmp_path / "tech", name="tech alice")
    child = spawn(device_dir, transcript)
    child.sendline("login key")
    child.expect(CHALLENGE)
    answer = technician.answer(child.match.group(1), tech.key_path, tech.cert_path)
    child.expect("answer: ")
    child.sendline(answer)
    child.expect(r"logged in \(CN=tech alice")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    assert [b["who"] for b in outbox(device_dir) if b["event"] == "login"] == ["CN=tech alice,O=edgeops"]


def test_a_signed_answer_to_an_earlier_challenge_is_refused(device_dir: Path, pki: Keys,
                                                            transcript: Path, tmp_path: Path) -> None:
    tech = technician.issue_technician(pki.root, tmp_path / "tech", name="tech bob")
    child = spawn(device_dir, transcript)
    child.sendline("login key")
    child.expect(CHALLENGE)
    first = technician.answer(child.match.group(1), tech.key_path, tech.cert_path)
    child.sendline("")  # abandon it
    child.expect("login failed")
    child.sendline("login key")
    child.expect(CHALLENGE)
    child.expect("answer: ")
    child.sendline(first)  # replayed
    child.expect("login failed: the answer's signature does not match this challenge")
    child.sendline("exit")
    child.expect(pexpect.EOF)


def test_every_read_only_command_answers(pinned: Path, transcript: Path, tmp_path: Path) -> None:
    child = spawn(pinned, transcript)
    login_pin(child)
    child.expect("logged in")
    for cmd, shows in [("status", "booted    slot A"), ("slots", r"\* A    good   1\.0"),
                       ("history 5", "provisioned"), ("health", "1 of 1 checks passed"),
                       ("logs 5", "console-login"), ("network", "controller: none configured"),
                       ("tpm", "root of trust: none"), ("help install", "changes the device"),
                       (f"diag {tmp_path}", "no keys, tokens or PIN")]:
        child.sendline(cmd)
        child.expect(shows)
    child.sendline("exit")
    child.expect(pexpect.EOF)
    (diag,) = tmp_path.glob("edgeops-diag-*.tar.gz")
    import tarfile

    with tarfile.open(diag) as tar:
        names = {Path(n).name for n in tar.getnames()}
        blob = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())  # type: ignore[union-attr]
    assert names == {"status.json", "history.json", "logs.txt", "board-check.txt", "about.json"}
    pin_record = (pinned / "state" / "console" / "pin").read_bytes()
    assert json.loads(pin_record)["hash"].encode() not in blob and b"BEGIN PRIVATE KEY" not in blob


def test_an_install_shows_what_was_verified_and_waits_for_yes(
        pinned: Path, make_bundle: BundleFactory, transcript: Path) -> None:
    bundle = make_bundle("2.0", security_version=3)
    child = spawn(pinned, transcript)
    login_pin(child)
    child.expect("logged in")
    child.sendline(f"install {bundle}")
    child.expect("verified: signature, signer and policy are good")
    child.expect(r"version   2\.0 \(security 3, for edgeops-sim\)")
    child.expect("signer    CN=edgeops signer")
    child.expect(r"size      300000 bytes")
    child.expect("effect    slot B")
    child.expect("type 'yes' to go on: ")
    child.sendline("no")
    child.expect("cancelled: nothing changed")
    child.sendline(f"install {bundle}")
    child.expect("type 'yes' to go on: ")
    child.sendline("yes")
    child.expect("100% written")
    child.expect(r"installed 2\.0 into slot B")
    child.sendline("status")
    child.expect("next boot tries slot B once")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    cmds = [b for b in outbox(pinned) if b["event"] == "command"]
    assert [c["outcome"] for c in cmds] == ["cancelled", "ok: 2.0 into slot B"]


def test_an_untrusted_bundle_is_refused_before_any_confirmation(
        pinned: Path, make_bundle: BundleFactory, transcript: Path) -> None:
    bundle = make_bundle("2.0", compatible="someone-else")
    child = spawn(pinned, transcript)
    login_pin(child)
    child.expect("logged in")
    child.sendline(f"install {bundle}")
    child.expect("error: bundle is for 'someone-else'")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    assert "type 'yes'" not in transcript.read_text()
    cfg = load(pinned / "agent.toml")
    assert run_cli("status", "--json", "--config", cfg.path).stdout.count('"empty"') == 1


def test_mark_good_rollback_and_reboot_need_their_state_and_say_why(
        pinned: Path, transcript: Path) -> None:
    child = spawn(pinned, transcript)
    login_pin(child)
    child.expect("logged in")
    child.sendline("mark-good")
    child.expect("needs the device to be testing, it is idle")
    child.sendline("mark-bad")
    child.expect("needs the device to be testing, it is idle")
    child.sendline("rollback")
    child.expect("type 'yes' to go on: ")
    child.sendline("yes")
    child.expect("error: ")  # slot B holds nothing to go back to
    child.sendline("reboot")
    child.expect("type 'yes' to go on: ")
    child.sendline("yes")
    child.expect("rebooting")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    outcomes = [(b["command"], b["outcome"]) for b in outbox(pinned) if b["event"] == "command"]
    assert [c for c, _ in outcomes] == ["mark-good", "mark-bad", "rollback", "reboot"]
    assert all(o.startswith("failed") for _, o in outcomes[:3]) and outcomes[3][1] == "ok: rebooting"


@pytest.mark.parametrize("verdict, primary", [("mark-good", r"\* B    good   2\.0"),
                                              ("mark-bad", r"  B    bad")])
def test_a_verdict_on_the_console_reaches_the_running_agents_health_loop(
        pinned: Path, make_bundle: BundleFactory, transcript: Path, verdict: str, primary: str) -> None:
    import subprocess

    from tests.test_cli import wait_until_locked

    cfg = pinned / "agent.toml"
    # the app never comes up: the agent's health loop holds the lock, probing every 45 s
    health = {"deadline": 120, "interval": 45, "retries": 100,
              "probe": [{"type": "command", "command": ["false"], "name": "app"}]}
    run_cli("install", make_bundle("2.0", health=health), "--config", cfg, check=True)
    run_cli("sim", "reboot", "--config", cfg, check=True)
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--once", "--config",
                              str(cfg)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        wait_until_locked(pinned / "state" / "lock")
        child = spawn(pinned, transcript)
        login_pin(child)
        child.expect("logged in")
        child.sendline("status")
        child.expect(r"booted    slot B  \(trial\)")  # reads while the agent holds the lock
        child.sendline(verdict)
        child.expect("handed to the running agent")
        assert agent.wait(20) == 0
        child.sendline("slots")
        child.expect(primary)
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        agent.kill()
        agent.wait()


def test_rollback_from_the_console_makes_the_old_slot_primary(
        pinned: Path, make_bundle: BundleFactory, transcript: Path) -> None:
    cfg = pinned / "agent.toml"
    run_cli("install", make_bundle("2.0", security_version=0), "--config", cfg, check=True)
    run_cli("sim", "reboot", "--config", cfg, check=True)
    run_cli("agent", "--once", "--config", cfg, check=True)  # the trial passes and commits
    child = spawn(pinned, transcript)
    login_pin(child)
    child.expect("logged in")
    child.sendline("slots")
    child.expect(r"\* B    good   2\.0")
    child.sendline("rollback")
    child.expect("type 'yes' to go on: ")
    child.sendline("yes")
    child.expect("rolled back: slot A is primary again")
    child.sendline("status")
    child.expect("primary   slot A")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    assert [b["outcome"] for b in outbox(pinned) if b["event"] == "command"] == ["ok: slot A primary"]


def test_ctrl_c_at_the_confirmation_cancels_and_the_console_goes_on(
        pinned: Path, make_bundle: BundleFactory, transcript: Path) -> None:
    bundle = make_bundle("2.0")
    child = spawn(pinned, transcript)
    login_pin(child)
    child.expect("logged in")
    child.sendline(f"install {bundle}")
    child.expect("type 'yes' to go on: ")
    child.sendintr()
    child.expect(r"\^C")
    child.sendline("slots")
    child.expect(r"  B    empty")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    assert [b["outcome"] for b in outbox(pinned) if b["event"] == "command"] == ["cancelled: Ctrl-C"]


def test_a_hangup_at_the_confirmation_changes_nothing_and_ends_the_session(
        pinned: Path, make_bundle: BundleFactory, transcript: Path) -> None:
    bundle = make_bundle("2.0")
    child = spawn(pinned, transcript)
    login_pin(child)
    child.expect("logged in")
    child.sendline(f"install {bundle}")
    child.expect("type 'yes' to go on: ")
    child.kill(signal.SIGHUP)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    events = history(pinned)
    assert events[-2][0] == "console-command" and events[-2][1].startswith("who=pin via=pin cmd=install ")
    assert events[-2][1].endswith("outcome=cancelled: the terminal hung up")
    assert events[-1][0] == "console-logout" and "outcome=hangup" in events[-1][1]
    status = json.loads(run_cli("status", "--json", "--config", pinned / "agent.toml").stdout)
    assert status["slots"]["B"]["state"] == "empty" and status["phase"] == "idle"


def test_a_hangup_mid_install_lets_the_write_finish_then_ends_the_session(
        pki: Keys, tmp_path: Path, make_bundle: BundleFactory, transcript: Path) -> None:
    from agent.host import sim

    d = tmp_path / "big"
    sim.init_device(d, image=make_image(tmp_path / "v1b.img", 300_000, "1.0"), keyring=pki.root_crt,
                    version="1.0", slot_size=96 << 20)
    console.set_pin(load(d / "agent.toml"), PIN)
    bundle = make_bundle("2.0", size=80 << 20)
    child = spawn(d, transcript)
    login_pin(child)
    child.expect("logged in")
    child.sendline(f"install {bundle}")
    child.expect("type 'yes' to go on: ")
    child.sendline("yes")
    child.expect("10% written")
    child.kill(signal.SIGHUP)  # the cable is pulled while the slot is written
    child.expect(pexpect.EOF, timeout=120)
    child.close()
    status = json.loads(run_cli("status", "--json", "--config", d / "agent.toml").stdout)
    assert status["slots"]["B"]["version"] == "2.0" and status["trial_pending_slot"] == "B"
    events = history(d)
    assert [e for e, _ in events][-2:] == ["console-command", "console-logout"]
    assert "outcome=ok: 2.0 into slot B" in events[-2][1] and "outcome=hangup" in events[-1][1]


def test_an_idle_logged_in_console_does_not_hold_up_the_agent(pinned: Path, transcript: Path) -> None:
    child = spawn(pinned, transcript)
    login_pin(child)
    child.expect("logged in")
    proc = run_cli("agent", "--once", "--config", pinned / "agent.toml")
    assert proc.returncode == 0, proc.stderr
    assert "phase: idle" in proc.stdout
    child.sendline("exit")
    child.expect(pexpect.EOF)


def test_a_usb_stick_install_is_offered_verified_and_confirmed_on_the_console(
        pinned: Path, make_bundle: BundleFactory, transcript: Path, tmp_path: Path) -> None:
    from contextlib import nullcontext

    from agent.adapters import usb
    from agent.device import usb_updates
    from agent.device.updater import Updater, open_device
    from tests.usbsticks import ext4_stick

    tree = tmp_path / "tree"
    (tree / "edgeops").mkdir(parents=True)
    (tree / "edgeops" / "v2.bundle").write_bytes(make_bundle("2.0").read_bytes())
    cfg = load(pinned / "agent.toml")
    with ext4_stick(tree, tmp_path / "stick.ext4") as dev:
        device = open_device(cfg)
        watcher = usb_updates.UsbWatcher(lambda: nullcontext(Updater(device)), cfg.state_dir, "offer")
        watcher.handle(usb.BlockEvent("add", dev, "disk", "ext4", "usb"))  # as udev reports it
        device.close()
        child = spawn(pinned, transcript)
        child.expect(f"USB stick {dev}: edgeops/v2.bundle")
        login_pin(child)
        child.expect("logged in")
        child.sendline("install usb")
        child.expect("verified: signature, signer and policy are good")
        child.expect(rf"bundle    {dev}:edgeops/v2\.bundle")
        child.expect("type 'yes' to go on: ")
        child.sendline("yes")
        child.expect(r"installed 2\.0 into slot B")
        child.sendline("exit")
        child.expect(pexpect.EOF)
        assert str(cfg.state_dir / "usb" / "mnt") not in Path("/proc/self/mounts").read_text()
    assert load(pinned / "agent.toml") and json.loads(
        run_cli("status", "--json", "--config", pinned / "agent.toml").stdout)["trial_pending_slot"] == "B"
