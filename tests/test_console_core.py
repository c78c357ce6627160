"""The console's pure parts: command table, PIN policy and record, lockout back-off, challenge
and answer, audit records, the [console] settings. Tables, and hypothesis for what parses input."""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core import console_audit, console_auth, console_commands, console_policy, trust
from agent.core import console_challenge as cc
from agent.errors import (
    ConfigError,
    SignatureError,
    SignerExpired,
    SignerRevoked,
    TrustError,
    UntrustedSigner,
    UsageError,
)
from agent.host import keys, technician

NOW = 1_800_000_000.0


# --- the command table -------------------------------------------------------------------------
@pytest.mark.parametrize("line, name, args", [
    ("status", "status", ()),
    ("  STATUS  ", "status", ()),
    ("history 50", "history", ("50",)),
    ("install '/media/my stick/b.eob'", "install", ("/media/my stick/b.eob",)),
    ("quit", "exit", ()),
    ("?", "help", ()),
    ("mark_good", "mark-good", ()),
])
def test_a_line_parses_to_its_command_and_arguments(line: str, name: str, args: tuple[str, ...]) -> None:
    parsed = console_commands.parse_line(line)
    assert parsed is not None and (parsed.command.name, parsed.args) == (name, args)


@pytest.mark.parametrize("line, words", [
    ("frobnicate", "unknown command"),
    ("stat", "did you mean status"),
    ("status now", "takes no arguments"),
    ("install a b", "takes one argument"),
    ("install 'unclosed", "close the quote"),
    ("x" * 2000, "at most 1024"),
])
def test_a_bad_line_is_one_usage_error_saying_what_to_type(line: str, words: str) -> None:
    with pytest.raises(UsageError) as e:
        console_commands.parse_line(line)
    assert words in e.value.one_line()


def test_an_empty_line_is_no_command() -> None:
    assert console_commands.parse_line("   ") is None


@given(st.text(max_size=300))
def test_any_line_parses_or_raises_only_a_usage_error(line: str) -> None:
    with contextlib.suppress(UsageError):
        console_commands.parse_line(line)


@pytest.mark.parametrize("name, logged_in, open_ro, ok", [
    ("status", False, False, False),
    ("status", False, True, True),
    ("status", True, False, True),
    ("install", False, True, False),  # state changes need a login whatever the board opens
    ("reboot", False, True, False),
    ("mark-good", True, False, True),
    ("diag", False, True, False),  # writes a file: needs a login
    ("help", False, False, True),
    ("login", False, False, True),
])
def test_the_access_rule(name: str, logged_in: bool, open_ro: bool, ok: bool) -> None:
    cmd = console_commands.BY_NAME[name]
    assert console_commands.allowed(cmd, logged_in=logged_in, open_read_only=open_ro) is ok


def test_every_state_change_in_the_table_needs_a_login() -> None:
    for cmd in console_commands.COMMANDS:
        if cmd.changes_state:
            assert not console_commands.allowed(cmd, logged_in=False, open_read_only=True), cmd.name


@pytest.mark.parametrize("prefix, hits", [
    ("st", ["status"]), ("mark", ["mark-good", "mark-bad"]), ("lo", ["login", "logout", "logs"]),
    ("zz", []), ("", [c.name for c in console_commands.COMMANDS]),
])
def test_completion_offers_the_commands_with_that_prefix(prefix: str, hits: list[str]) -> None:
    assert console_commands.completions(prefix) == hits


def test_help_fits_an_80_column_terminal_and_names_every_command() -> None:
    text = console_commands.help_text()
    assert all(len(line) <= 78 for line in text.splitlines())
    for cmd in console_commands.COMMANDS:
        assert f" {cmd.name} " in text


# --- PIN ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pin, words", [
    ("12345", "6 to 32 digits"), ("1" * 33, "6 to 32 digits"), ("12a456", "digits only"),
    ("111111", "repeated digit"), ("123456", "plain run"), ("987654", "plain run"),
    ("٣٣٤٥٦٧", "digits only"),  # Arabic-Indic digits: isdigit() but not typeable on a keypad
])
def test_a_weak_or_malformed_pin_is_refused(pin: str, words: str) -> None:
    with pytest.raises(UsageError) as e:
        console_auth.check_pin_policy(pin)
    assert words in str(e.value)


FAST = {"n": 2**4, "r": 1, "p": 1}  # the record's own parameters: the same code path, quicker


def test_the_right_pin_matches_and_a_wrong_one_does_not() -> None:
    rec = console_auth.hash_pin("135790", b"s" * 16, **FAST)
    assert console_auth.pin_matches(rec, "135790")
    assert not console_auth.pin_matches(rec, "135791")
    assert not console_auth.pin_matches(rec, "9" * 1000)


def test_the_record_keeps_no_pin_and_reads_back_with_its_parameters() -> None:
    rec = console_auth.hash_pin("135790", b"s" * 16, **FAST)
    text = rec.to_json()
    assert "135790" not in text
    back = console_auth.PinRecord.from_json(text, "pin")
    assert back == rec and console_auth.pin_matches(back, "135790")


def test_the_default_parameters_are_the_slow_ones() -> None:
    rec = console_auth.hash_pin("135790", b"s" * 16)
    assert (rec.n, rec.r, rec.p) == (2**14, 8, 1)


@pytest.mark.parametrize("text", [
    "", "{}", "not json", '{"v": 1, "kdf": "md5", "n": 16, "r": 1, "p": 1, "salt": "00", "hash": "00"}',
    '{"v": 1, "kdf": "scrypt", "n": 1099511627776, "r": 8, "p": 1, "salt": "' + "00" * 16
    + '", "hash": "' + "00" * 32 + '"}',  # a file asking for a terabyte of memory
    '{"v": 1, "kdf": "scrypt", "n": 1000, "r": 8, "p": 1, "salt": "' + "00" * 16
    + '", "hash": "' + "00" * 32 + '"}',  # N not a power of two
])
def test_a_damaged_record_is_one_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="not a console PIN record"):
        console_auth.PinRecord.from_json(text, "pin")


# --- lockout ------------------------------------------------------------------------------------
@pytest.mark.parametrize("failures, delay", [
    (0, 0), (1, 0), (2, 0), (3, 30), (4, 60), (5, 120), (8, 960), (9, 1920), (10, 3600), (50, 3600),
])
def test_the_back_off_after_n_failures(failures: int, delay: float) -> None:
    assert console_auth.delay_after(failures) == delay


def test_failures_accumulate_and_a_success_clears_them() -> None:
    s = console_auth.Lockout()
    for _ in range(3):
        s = console_auth.after_failure(s, NOW)
    assert console_auth.wait_left(s, NOW)[1] == 30
    assert console_auth.wait_left(s, NOW + 31)[1] == 0
    assert console_auth.after_success(s) == console_auth.Lockout()


def test_a_clock_set_back_cannot_lock_for_longer_than_an_hour() -> None:
    s = console_auth.after_failure(console_auth.Lockout(9), NOW)  # locked until NOW + 1 h
    kept, wait = console_auth.wait_left(s, NOW - 10 * 86400)
    assert wait == console_auth.MAX_DELAY and kept.failures == s.failures


@pytest.mark.parametrize("raw", ["damaged", {"failures": "x"}, {"nope": 1}, [1, 2]])
def test_a_damaged_lockout_record_counts_as_locked(raw: object) -> None:
    _state, wait = console_auth.wait_left(console_auth.Lockout.from_dict(raw), NOW)
    assert wait == console_auth.MAX_DELAY


def test_the_lockout_record_round_trips() -> None:
    s = console_auth.Lockout(4, NOW + 60)
    assert console_auth.Lockout.from_dict(s.to_dict()) == s


# --- challenge and answer -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def techpki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("techpki")
    keys.init_root(base / "root")
    t = technician.issue_technician(base / "root", base / "tech", name="alice")
    s = keys.issue_signer(base / "root", base / "signer")
    keys.init_root(base / "other")
    o = technician.issue_technician(base / "other", base / "othertech", name="mallory")
    return {"root": base / "root", "key": t.key_path, "crt": t.cert_path, "signer_key": s.key_path,
            "signer_crt": s.cert_path, "other_key": o.key_path, "other_crt": o.cert_path}


def _judge(pki: dict[str, Path], ch: cc.Challenge, answer: str, *, now: float,
           crls: list[bytes] | None = None, best: int | None = None) -> cc.Technician:
    ring = trust.Keyring.from_pem((pki["root"] / "root.crt").read_bytes())
    return cc.verify_answer(ch, answer, keyring=ring, crls=crls or [], now=now,
                            best_known_time=int(now) if best is None else best)


def _now() -> float:
    return dt.datetime.now(dt.UTC).timestamp()


def test_a_signed_answer_logs_the_technician_in(techpki: dict[str, Path]) -> None:
    ch = cc.Challenge.make("dev-1", b"\x01" * 16, _now())
    ans = technician.answer(ch.text(), techpki["key"], techpki["crt"])
    assert _judge(techpki, ch, ans, now=_now()).name.startswith("CN=alice")


def test_an_answer_to_another_challenge_is_refused(techpki: dict[str, Path]) -> None:
    old = cc.Challenge.make("dev-1", b"\x01" * 16, _now())
    new = cc.Challenge.make("dev-1", b"\x02" * 16, _now())
    ans = technician.answer(old.text(), techpki["key"], techpki["crt"])
    with pytest.raises(SignatureError, match="does not match this challenge"):
        _judge(techpki, new, ans, now=_now())


def test_an_answer_for_another_device_is_refused(techpki: dict[str, Path]) -> None:
    here = cc.Challenge.make("dev-1", b"\x01" * 16, _now())
    there = cc.Challenge("dev-2", here.nonce, here.expires)
    ans = technician.answer(there.text(), techpki["key"], techpki["crt"])
    with pytest.raises(SignatureError):
        _judge(techpki, here, ans, now=_now())


def test_an_expired_challenge_is_refused(techpki: dict[str, Path]) -> None:
    ch = cc.Challenge.make("dev-1", b"\x01" * 16, _now())
    ans = technician.answer(ch.text(), techpki["key"], techpki["crt"])
    with pytest.raises(SignerExpired, match="challenge expired"):
        _judge(techpki, ch, ans, now=_now() + cc.CHALLENGE_TTL + 1)


def test_a_revoked_technician_is_refused(techpki: dict[str, Path], tmp_path: Path) -> None:
    crl = keys.revoke(techpki["root"], [keys.cert_serial(techpki["crt"])]).read_bytes()
    ch = cc.Challenge.make("dev-1", b"\x01" * 16, _now())
    ans = technician.answer(ch.text(), techpki["key"], techpki["crt"])
    with pytest.raises(SignerRevoked, match="is revoked"):
        _judge(techpki, ch, ans, now=_now(), crls=[crl])
    (techpki["root"] / "revoked.crl").unlink()  # the module's other tests use the same root


def test_a_technician_expired_at_the_best_known_time_is_refused(techpki: dict[str, Path]) -> None:
    ch = cc.Challenge.make("dev-1", b"\x01" * 16, _now())
    ans = technician.answer(ch.text(), techpki["key"], techpki["crt"])
    with pytest.raises(SignerExpired, match="not valid now"):
        _judge(techpki, ch, ans, now=_now(), best=int(_now()) + 400 * 86400)


def test_a_bundle_signer_cannot_log_in(techpki: dict[str, Path]) -> None:
    with pytest.raises(UntrustedSigner, match="not a technician certificate"):
        technician.answer("edgeops-console-v1 d " + "0" * 32 + " 1", techpki["signer_key"],
                          techpki["signer_crt"])
    # nor with an answer forged by hand around the signer's certificate
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ch = cc.Challenge.make("dev-1", b"\x01" * 16, _now())
    der = x509.load_pem_x509_certificate(techpki["signer_crt"].read_bytes()).public_bytes(
        serialization.Encoding.DER)
    sig = keys.load_signing_key(techpki["signer_key"]).sign(ch.text().encode())
    with pytest.raises(UntrustedSigner, match="not a technician certificate"):
        _judge(techpki, ch, cc.encode_answer([der], sig), now=_now())


def test_a_technician_of_another_root_is_refused(techpki: dict[str, Path]) -> None:
    ch = cc.Challenge.make("dev-1", b"\x01" * 16, _now())
    ans = technician.answer(ch.text(), techpki["other_key"], techpki["other_crt"])
    with pytest.raises(UntrustedSigner, match="not certified by a trusted root"):
        _judge(techpki, ch, ans, now=_now())


@given(st.text(max_size=400))
def test_any_answer_text_is_judged_or_refused_with_a_trust_error(text: str) -> None:
    ring = trust.Keyring(())
    ch = cc.Challenge("d", "0" * 32, 2**40)
    with pytest.raises(TrustError):
        cc.verify_answer(ch, text, keyring=ring, crls=[], now=0, best_known_time=0)


@pytest.mark.parametrize("text", [
    "", "edgeops-console-v1", "edgeops-console-v1 d 00 1", "edgeops-console-v2 d " + "0" * 32 + " 1",
    "edgeops-console-v1 d;rm " + "0" * 32 + " 1", "edgeops-console-v1 d " + "0" * 32 + " soon",
])
def test_a_mangled_challenge_is_refused_by_the_host_tool(text: str) -> None:
    with pytest.raises(TrustError, match="not a console challenge"):
        cc.Challenge.parse(text)


def test_the_challenge_text_round_trips() -> None:
    ch = cc.Challenge.make("gw-0042", bytes(range(16)), NOW)
    assert cc.Challenge.parse(ch.text()) == ch and ch.expires == int(NOW) + cc.CHALLENGE_TTL


# --- audit and settings ---------------------------------------------------------------------------
def test_an_audit_record_drops_control_characters_and_is_bounded() -> None:
    ev = console_audit.AuditEvent(NOW, "command", "pin", "pin", "install \x1b[2J" + "x" * 500, "ok")
    h = ev.history()
    assert h.event == "console-command" and "\x1b" not in h.detail and len(h.detail) <= 400
    body = ev.outbox_body()
    assert "\x1b" not in body["command"] and len(body["command"]) <= 80


def test_an_unknown_audit_event_is_a_bug() -> None:
    with pytest.raises(ValueError):
        console_audit.AuditEvent(NOW, "shrug", "-", "-")


def test_an_audit_row_travels_as_one_bounded_attribute() -> None:
    key, value = console_audit.attribute(7, {"ts": NOW, "event": "login", "who": "CN=a" * 100})
    assert key == "edgeops.console.audit.7" and len(value) <= 128


@pytest.mark.parametrize("table, words", [
    ({"usb": "sometimes"}, "usb must be one of"),
    ({"open_read_only": "yes"}, "true or false"),
    ({"pin_file": "../../etc/shadow"}, "inside state_dir"),
    ({"device": "/dev/ttyS0"}, "tty name"),
    ({"idle_logout": 1}, "10 to 86400"),
    ({"colour": True}, "unknown keys"),
])
def test_a_bad_console_section_is_one_config_error(table: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        console_policy.parse_console(table, "agent.toml")


def test_the_console_section_parses() -> None:
    s = console_policy.parse_console({"device": "ttyAMA0", "usb": "install", "open_read_only": True},
                                     "agent.toml")
    assert (s.device, s.usb, s.open_read_only) == ("ttyAMA0", "install", True)


@given(st.lists(st.tuples(st.booleans(), st.floats(min_value=-1e6, max_value=1e6)), max_size=40))
def test_the_lockout_never_waits_more_than_an_hour_and_a_success_clears_it(
        steps: list[tuple[bool, float]]) -> None:
    s = console_auth.Lockout()
    now = NOW
    for ok, dt_ in steps:
        now += dt_  # clocks jump both ways
        s, wait = console_auth.wait_left(s, now)
        assert 0 <= wait <= console_auth.MAX_DELAY
        s = console_auth.after_success(s) if ok else console_auth.after_failure(s, now)
        if ok:
            assert console_auth.wait_left(s, now)[1] == 0
