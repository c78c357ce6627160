"""The technician console: a login, a command loop on a serial port or terminal, and its audit trail.

Runs as its own process (``edgeops console``, started on the board's serial port by
``image/systemd/edgeops-console@.service``) beside the agent, never inside it: it reads the
journal (SQLite WAL readers do not block the agent) and takes the device lock only inside
the updater's state-changing calls, which refuse at once when the agent holds it, except
mark-good/mark-bad, handed to the running health loop as ``edgeops mark-good`` does.

The terminal (plain, or readline and colour where allowed) is ``console_terminal``. A
hangup (SIGHUP) or end of input ends the session: at once while it waits for input (a
confirmation included); during a state change, a login or an audit only after it finished,
so a cable pulled mid-install neither interrupts the write nor leaves a session logged in.

Access (``agent.core.console_auth``, ``console_challenge``, ``console_commands``): a PIN
(scrypt record, 0600) and/or a signed challenge; failed attempts back off, the lockout is
persisted in ``STATE/console/lockout.json``. Every login, failure and state change is an
``AuditEvent`` in the journal's history and its outbox (``agent.core.console_audit``).
Long because (about 480 lines) login, the loop, the confirmations and the audit share one
session's state; the terminal is ``console_terminal``, the read-only views ``console_views``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from agent.adapters.fsutil import SECRET, atomic_write
from agent.core import console_audit, console_auth, console_commands
from agent.core.config import AgentConfig
from agent.device import console_views as views
from agent.device import usb_updates
from agent.device.console_terminal import Hangup, Progress, Terminal
from agent.device.updater import Updater, open_device
from agent.errors import DeviceBusy, EdgeopsError, StateError, UsageError

MAX_REFUSALS_AUDITED = 10
# seconds a console command waits for the device lock an agent cycle holds (a poll, a report)
LOCK_WAIT = 30.0


def pin_path(cfg: AgentConfig) -> Path:
    return cfg.state_dir / cfg.console.pin_file


def set_pin(cfg: AgentConfig, pin: str) -> Path:
    """Store ``pin`` as a scrypt record, 0600 (``edgeops console set-pin``, provisioning)."""
    rec = console_auth.hash_pin(pin, os.urandom(console_auth.SALT_BYTES))
    path = pin_path(cfg)
    atomic_write(path, rec.to_json(), mode=SECRET, dir_mode=0o700)
    return path


def device_id(cfg: AgentConfig) -> str:
    """The name a challenge carries: the fleet's controller id (from its ``controller_id_file``
    too, the board's serial), else the host name."""
    from agent.device import fleet_files
    from agent.errors import EdgeopsError

    fleet = views.fleet_of(cfg)
    raw = ""
    if fleet is not None:
        try:
            raw = fleet_files.read_controller_id(fleet).controller_id
        except EdgeopsError:  # an unreadable serial: the console still answers, by host name
            raw = ""
    raw = raw or socket.gethostname()
    clean = "".join(ch for ch in raw if ch.isalnum() or ch in "._:-")[:64]
    return clean or "edgeops-device"


class Session:
    def __init__(self, cfg: AgentConfig, term: Terminal, *, tty_name: str = "",
                 clock: Callable[[], float] = time.time,
                 opener: usb_updates.Opener | None = None) -> None:
        self.cfg, self.term, self.clock = cfg, term, clock
        self.tty_name = tty_name
        self.who: str | None = None
        self.method = "-"
        self.last_input = clock()
        self.busy = False
        self.hung_up = False
        self.opener = opener or usb_updates.default_opener(cfg.state_dir)
        self.id = device_id(cfg)
        self.refusals = 0  # refused commands audited this session (bounded: see one())
        self.offer_shown: tuple[str, tuple[str, ...], float] | None = None  # the last one noted

    # --- the device, opened per session, an Updater per command ---------------------------------
    @contextmanager
    def updater(self) -> Iterator[Updater]:
        """The device opened for one command and closed after it: an idle console holds no
        journal handle (a journal replaced by 'edgeops journal recover' is simply used next)."""
        dev = open_device(self.cfg)
        try:
            up = Updater(dev)
            # an agent cycle holds the lock for seconds: wait it out rather than answer "busy"
            up.lock_wait = LOCK_WAIT
            up.on_lock_wait = lambda s: self.term.write(
                f"the agent is busy (its cycle holds the device): waiting up to {s:.0f} s")
            yield up
        finally:
            dev.close()

    def close(self) -> None:
        pass

    # --- audit ------------------------------------------------------------------------------
    def audit(self, event: str, command: str = "", outcome: str = "") -> None:
        ev = console_audit.AuditEvent(self.clock(), event, self.who or "-", self.method, command,
                                      outcome, self.tty_name)
        try:
            with self.updater() as up:
                up.journal.record([ev.history()], now=ev.ts)
                up.journal.enqueue(console_audit.KIND, ev.outbox_body(), now=ev.ts)
        except EdgeopsError as exc:  # a full disk must not hide what happened on the screen
            self.term.write(f"(audit not recorded: {exc.one_line()})")

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        old = signal.signal(signal.SIGHUP, self._on_hangup)
        old_int = signal.signal(signal.SIGINT, self._on_interrupt)
        try:
            self.term.write(f"edgeops console on {self.id} ({self.cfg.board}); 'help' lists commands")
            if not self.cfg.console.open_read_only:
                self.term.write("log in first: 'login' (PIN) or 'login key' (signed challenge)")
            while not self.hung_up:
                # a stick put in during the session is announced at the next prompt (the
                # technician logs in first, then plugs it in)
                self._offer_note()
                try:
                    line = self.term.read(self._prompt())
                    if not self.one(line):
                        break
                except Hangup:
                    break
                except KeyboardInterrupt:  # Ctrl-C at a prompt or a question: a fresh prompt
                    self.term.write("^C")
        finally:
            signal.signal(signal.SIGHUP, old)
            signal.signal(signal.SIGINT, old_int)
            if self.who is not None:
                self.audit("logout", outcome="hangup" if self.hung_up else "session ended")
            self.close()
        return 0

    def _on_hangup(self, signum: int, frame: object) -> None:
        self.hung_up = True
        if not self.busy or self.term.reading:  # nothing is being written: stop now
            raise Hangup("hangup")

    def _on_interrupt(self, signum: int, frame: object) -> None:
        if self.busy and not self.term.reading:  # a command at work is not cut off mid-write
            self.term.write("(busy: Ctrl-C takes effect when this command has finished)")
            return
        raise KeyboardInterrupt

    def _prompt(self) -> str:
        return f"{self.id}{'#' if self.who else '>'} "

    def one(self, line: str) -> bool:
        """Run one line; False ends the session."""
        now = self.clock()
        if self.who is not None and now - self.last_input > self.cfg.console.idle_logout:
            self.audit("logout", outcome="idle")
            self.who, self.method = None, "-"
            self.term.write("(logged out after being idle)")
        self.last_input = now
        try:
            parsed = console_commands.parse_line(line)
            if parsed is None:
                return True
            cmd = parsed.command
            if cmd.name == "exit":
                return False
            if not console_commands.allowed(cmd, logged_in=self.who is not None,
                                            open_read_only=self.cfg.console.open_read_only):
                self.term.write(f"'{cmd.name}' needs a login: type 'login' or 'login key'")
                if cmd.changes_state:
                    # bounded, so typing at the port cannot push the install history out
                    # of the journal (MAX_HISTORY rows); failed logins are bounded by the back-off
                    self.refusals += 1
                    if self.refusals <= MAX_REFUSALS_AUDITED:
                        more = " (further refusals this session not recorded)" \
                            if self.refusals == MAX_REFUSALS_AUDITED else ""
                        self.audit("command", line, "refused: not logged in" + more)
                return True
            handler = getattr(self, "do_" + cmd.name.replace("-", "_"))
            # a hangup waits for a state change (and its audit row) or a login (and its
            # lockout record) to finish; only a wait for input ends at once
            self.busy = cmd.changes_state or cmd.name in ("login", "logout", "diag")
            try:
                if cmd.changes_state:
                    self._changing(handler, parsed.args, line)
                else:
                    handler(*parsed.args)
            finally:
                self.busy = False
        except Hangup:
            return False
        except EdgeopsError as exc:
            self.term.write(f"error: {exc.one_line()}")
        except Exception as exc:  # a bug: say so in one line and keep the console usable
            self.term.write(f"internal error (please report it): {type(exc).__name__}: {exc}")
            if cmd_changes_state(line):
                self.audit("command", line, f"failed: internal error {type(exc).__name__}")
        return not self.hung_up

    def _changing(self, handler: Callable[..., str], args: tuple[str, ...], line: str) -> None:
        try:
            outcome = handler(*args)
        except Hangup:
            self.audit("command", line, "cancelled: the terminal hung up")
            raise
        except KeyboardInterrupt:
            self.audit("command", line, "cancelled: Ctrl-C")
            raise
        except EdgeopsError as exc:
            self.audit("command", line, f"failed: {exc.one_line()}")
            raise
        if outcome:
            self.audit("command", line, outcome)

    # --- access ------------------------------------------------------------------------------
    @property
    def _lockout_path(self) -> Path:
        return self.cfg.state_dir / "console" / "lockout.json"

    def _lockout(self) -> console_auth.Lockout:
        import json

        try:
            raw = json.loads(self._lockout_path.read_text())
        except FileNotFoundError:
            return console_auth.Lockout()
        except (OSError, ValueError):
            raw = "damaged"
        return console_auth.Lockout.from_dict(raw)

    def _save_lockout(self, state: console_auth.Lockout) -> None:
        import json

        atomic_write(self._lockout_path, json.dumps(state.to_dict()), mode=SECRET, dir_mode=0o700)

    def do_login(self, how: str = "") -> None:
        if self.who is not None:
            self.term.write(f"already logged in as {self.who}")
            return
        state, wait = console_auth.wait_left(self._lockout(), self.clock())
        if wait > 0:
            self._save_lockout(state)
            # not audited: no PIN was asked for, and the lockout itself was ("locked-out")
            self.term.write(f"locked after {state.failures} failed logins: try again in {wait:.0f} s")
            return
        has_pin = pin_path(self.cfg).exists()
        how = how or ("pin" if has_pin else "key")
        if how not in ("pin", "key"):
            raise UsageError(f"login takes 'pin' or 'key', not {how[:20]!r}", hint="usage: login [pin|key]")
        failed = console_auth.after_failure(state, self.clock())
        # The attempt counts as a failure from the moment its secret is in, before it is
        # checked: a hangup or a power cut during the slow hash cannot make it free.
        submitted = [False]

        def count() -> None:
            submitted[0] = True
            self._save_lockout(failed)

        ok, who, why = self._login_pin(count) if how == "pin" else self._login_key(count)
        if ok:
            self._save_lockout(console_auth.after_success(state))
            self.who, self.method = who, how
            self.audit("login", outcome="ok")
            self.term.write(self.term.emph(f"logged in ({who})"))
            return
        self.term.write(f"login failed: {why}")
        if not submitted[0]:
            return  # nothing was tried (no PIN set on this device)
        self.method = how
        self.audit("login-failed", outcome=why)
        self.method = "-"
        _, wait = console_auth.wait_left(failed, self.clock())
        if wait > 0:
            self.audit("locked-out", outcome=f"{failed.failures} failures, {wait:.0f} s")
            self.term.write(f"{failed.failures} failed logins: locked for {wait:.0f} s")

    def _login_pin(self, count: Callable[[], None]) -> tuple[bool, str, str]:
        try:
            rec = console_auth.PinRecord.from_json(pin_path(self.cfg).read_text(), str(pin_path(self.cfg)))
        except FileNotFoundError:
            return False, "", "no technician PIN is set on this device (try 'login key')"
        pin = self.term.read("PIN: ", secret=True).strip()
        count()
        if console_auth.pin_matches(rec, pin):
            return True, "pin", ""
        return False, "", "wrong PIN"

    def _login_key(self, count: Callable[[], None]) -> tuple[bool, str, str]:
        from agent.adapters.truststore import TrustStore
        from agent.core import console_challenge as cc
        from agent.core import trust

        challenge = cc.Challenge.make(self.id, os.urandom(16), self.clock())
        self.term.write("sign this line with 'edgeops console answer' and paste the answer:")
        self.term.write(challenge.text())
        answer = self.term.read("answer: ")
        count()
        try:
            with self.updater() as up:
                store = TrustStore(self.cfg, up.journal, up.root())
                if store.root is not None:
                    store.root.check_keyring(store.keyring_pem())
                tech = cc.verify_answer(challenge, answer, keyring=store.keyring(),
                                        crls=store.stored_crls(), now=self.clock(),
                                        best_known_time=trust.best_known_time(self.clock(),
                                                                              up.journal.trusted_time))
        except EdgeopsError as exc:
            return False, "", exc.one_line()
        return True, tech.name, ""

    def do_logout(self) -> None:
        if self.who is not None:
            self.audit("logout", outcome="ok")
        self.who, self.method = None, "-"
        self.term.write("logged out")

    # --- read-only commands -------------------------------------------------------------------
    def do_help(self, name: str | None = None) -> None:
        self.term.write(console_commands.help_text(name))

    def _lines(self, lines: list[str]) -> None:
        for line in lines:
            self.term.write(line)

    def do_status(self) -> None:
        with self.updater() as up:
            self._lines(views.status_lines(up))

    def do_slots(self) -> None:
        with self.updater() as up:
            self._lines(views.slot_lines(up))

    def do_history(self, n: str = "20") -> None:
        with self.updater() as up:
            self._lines(views.history_lines(up, _count(n), audit=False))

    def do_logs(self, n: str = "20") -> None:
        with self.updater() as up:
            self._lines(views.log_lines(up, _count(n)))

    def do_health(self) -> None:
        with self.updater() as up:
            lines, ok = views.health_lines(up)
        self._lines(lines)
        self.term.write(self.term.emph("healthy" if ok else "NOT healthy", "32" if ok else "31"))

    def do_network(self) -> None:
        with self.updater() as up:
            self._lines(views.network_lines(up))

    def do_tpm(self) -> None:
        with self.updater() as up:
            self._lines(views.tpm_lines(up))

    def do_diag(self, where: str = "usb") -> None:
        with self.updater() as up:
            name, data = views.diag_bundle(up, self.id)
        if where == "usb":
            offer = self._offer()
            if offer is None:
                raise StateError("no USB stick is in", hint="insert one, or give a directory: 'diag DIR'")
            usb_updates.usb_write(self.cfg.state_dir, offer, name, data)
            self.term.write(f"wrote {name} to {offer.devnode} ({len(data)} bytes; status, history, "
                            f"logs, board check; no keys, tokens or PIN)")
            self.audit("command", "diag usb", "ok")
            return
        target = Path(where)
        if not target.is_dir():
            raise UsageError(f"{where[:60]} is not a directory", hint="usage: diag DIR")
        atomic_write(target / name, data)
        self.term.write(f"wrote {target / name} ({len(data)} bytes; status, history, logs, "
                        f"board check; no keys, tokens or PIN)")
        self.audit("command", f"diag {where}", "ok")

    # --- state changes (each returns the audit outcome) ---------------------------------------
    def _confirm(self, question: str) -> bool:
        answer = self.term.read(f"{question} type 'yes' to go on: ").strip().lower()
        if answer != "yes":
            self.term.write("cancelled: nothing changed")
        return answer == "yes"

    def do_install(self, source: str = "usb") -> str:
        if source == "usb":
            offer = self._offer()
            if offer is None or not offer.bundles:
                raise StateError("no USB stick with bundles is offered",
                                 hint="insert the stick and wait a few seconds, or 'install FILE'")
            return self._install_usb(offer)
        with self.updater() as up:
            try:
                f = open(source, "rb")  # noqa: SIM115 (closed below)
            except OSError as exc:
                raise UsageError(f"cannot open {source[:80]}: {exc.strerror}",
                                 hint="give the bundle's path, or 'install usb'") from None
            with f:
                pv = usb_updates.preview(up, f, source)
            return self._confirmed_install(up, pv, lambda: open(source, "rb"))

    def _install_usb(self, offer: usb_updates.Offer) -> str:
        with usb_updates.opened(self.opener, offer.devnode, offer.fs_type) as medium, \
                self.updater() as up:
            found = usb_updates.find_bundles(medium)
            if not found:
                raise StateError(f"{offer.devnode} holds no bundle now", hint="check the stick")
            pick = found[-1]
            if len(found) > 1:
                for i, fnd in enumerate(found, 1):
                    self.term.write(f"  {i}. {fnd.path}")
                choice = self.term.read(f"which bundle (1-{len(found)})? ").strip()
                if not choice.isdigit() or not 1 <= int(choice) <= len(found):
                    self.term.write("cancelled: nothing changed")
                    return "cancelled"
                pick = found[int(choice) - 1]
            with usb_updates.open_bundle(medium, pick.path) as stream:
                pv = usb_updates.preview(up, stream, f"{offer.devnode}:{pick.path}")
            return self._confirmed_install(up, pv, lambda: usb_updates.open_bundle(medium, pick.path))

    def _confirmed_install(self, up: Updater, pv: usb_updates.Preview, reopen: Callable[[], Any]) -> str:
        self.term.write(self.term.emph("verified: signature, signer and policy are good"))
        self._lines(pv.lines())
        if not self._confirm(f"install {pv.version} into slot {pv.target}?"):
            return "cancelled"
        progress = Progress(self.term)
        try:
            with reopen() as stream:
                result = usb_updates.install(up, stream, progress=progress, confirmed=pv)
        except DeviceBusy as exc:
            raise DeviceBusy(f"{exc}; the agent is working, try again in a minute") from None
        except EdgeopsError as exc:
            self.term.write(self.term.emph(f"install stopped: {exc.one_line()}", "31"))
            self.term.write(f"nothing committed: slot {pv.booted} is still active and the boot "
                            f"configuration is unchanged")
            raise
        self.term.write(f"installed {result.version} into slot {result.slot} "
                        f"({result.bytes_written} bytes); 'reboot' to try it once")
        return f"ok: {result.version} into slot {result.slot}"

    def do_rollback(self) -> str:
        if not self._confirm("make the other slot primary and boot it next?"):
            return "cancelled"
        with self.updater() as up:
            slot = up.rollback()
        self.term.write(f"rolled back: slot {slot} is primary again; 'reboot' to boot it")
        return f"ok: slot {slot} primary"

    def do_mark_good(self) -> str:
        return self._verdict(good=True)

    def do_mark_bad(self) -> str:
        return self._verdict(good=False)

    def _verdict(self, *, good: bool) -> str:
        with self.updater() as up:
            up.lock_wait = 0.0  # a held lock is the running health loop: the verdict goes to it
            up.mark_good() if good else up.mark_bad()
            self._lines(up.messages)
        return "ok"

    def do_reboot(self) -> str:
        if not self._confirm("reboot the device now?"):
            return "cancelled"
        self.audit("command", "reboot", "ok: rebooting")  # before: the reboot may not return
        with self.updater() as up:
            self.term.write("rebooting")
            up.dev.runtime.reboot("technician console")
        return ""

    # --- USB offers ------------------------------------------------------------------------
    def _offer(self) -> usb_updates.Offer | None:
        if self.cfg.console.usb == "off":
            return None
        offer = usb_updates.Offer.load(self.cfg.state_dir / usb_updates.OFFER_FILE)
        return offer if offer is not None and os.path.exists(offer.devnode) else None

    def _offer_note(self) -> None:
        """Say what the offered stick holds, once per stick (a new offer is a new stick)."""
        offer = self._offer()
        seen = None if offer is None else (offer.devnode, offer.bundles, offer.at)
        if seen == self.offer_shown:
            return
        self.offer_shown = seen
        if offer is not None and offer.bundles:
            self.term.write(f"USB stick {offer.devnode}: {', '.join(offer.bundles)} "
                            f"('install usb' after login)")
        elif offer is not None:
            self.term.write(f"USB stick {offer.devnode}: no bundles ('diag usb' writes there)")


def cmd_changes_state(line: str) -> bool:
    try:
        parsed = console_commands.parse_line(line)
    except UsageError:
        return False
    return parsed is not None and parsed.command.changes_state


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise UsageError(f"{text[:20]!r} is not a count from 1 to 1000", hint="e.g. 'history 50'")
    return int(text)


def run(cfg: AgentConfig, *, inp: IO[str] = sys.stdin, out: IO[str] = sys.stdout) -> int:
    tty = ""
    with suppress(OSError, ValueError):
        tty = os.ttyname(inp.fileno()) if inp.isatty() else ""
    return Session(cfg, Terminal(inp, out), tty_name=tty).run()
