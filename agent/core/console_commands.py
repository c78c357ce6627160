"""The technician console's command table: names, help, which change state; parsing one line. Pure.

A command that changes the device (``changes_state``) always needs a login and, on the
device, the device lock; the others only read, and a board may open them to anyone at the
serial port (``[console] open_read_only``). The table is data, so help, tab completion and
the access rule come from one place (``agent.device.console`` runs them).
"""

from __future__ import annotations

import shlex
import textwrap
from dataclasses import dataclass

from agent.errors import UsageError

MAX_LINE = 1024  # a console line longer than this is refused, not parsed


@dataclass(frozen=True)
class Command:
    name: str
    usage: str  # arguments, as help shows them
    summary: str
    changes_state: bool = False
    needs_login: bool = False  # even if read-only (e.g. diag writes a file, logs shows detail)
    max_args: int = 0


COMMANDS: tuple[Command, ...] = (
    Command("help", "[COMMAND]", "list commands, or explain one", max_args=1),
    Command("login", "[pin|key]", "log in with the technician PIN or a signed challenge",
            max_args=1),
    Command("logout", "", "end the technician session"),
    Command("status", "", "slots, versions, the boot state"),
    Command("slots", "", "each slot: state, version, security version, device"),
    Command("history", "[N]", "the last N install and health events (default 20)", max_args=1),
    Command("health", "", "run the health checks now and show each result"),
    Command("logs", "[N]", "the agent's last N journal entries, audit included (default 20)",
            max_args=1),
    Command("network", "", "interfaces, addresses, the controller's reachability, last contact"),
    Command("tpm", "", "the root of trust: anchor, counter, the identity's life left"),
    Command("install", "[FILE|usb]", "install a signed bundle from a file or the USB stick, "
            "after a confirmation", changes_state=True, max_args=1),
    Command("rollback", "", "make the other known-good slot primary again", changes_state=True),
    Command("mark-good", "", "commit the running trial now", changes_state=True),
    Command("mark-bad", "", "reject the running trial and revert", changes_state=True),
    Command("reboot", "", "reboot the device", changes_state=True),
    Command("diag", "[DIR|usb]", "write a diagnostics bundle (no secrets) to a directory or "
            "the USB stick", needs_login=True, max_args=1),
    Command("exit", "", "leave the console (same as logout, then end)"),
)
BY_NAME = {c.name: c for c in COMMANDS}
ALIASES = {"quit": "exit", "?": "help", "mark_good": "mark-good", "mark_bad": "mark-bad"}


@dataclass(frozen=True)
class Parsed:
    command: Command
    args: tuple[str, ...]


def parse_line(line: str) -> Parsed | None:
    """A console line as a command and its arguments; None for an empty line.

    Raises ``UsageError`` (one line, what to type instead) for an unknown command, too many
    arguments, unbalanced quotes or a line over ``MAX_LINE``."""
    if len(line) > MAX_LINE:
        raise UsageError(f"line is {len(line)} characters, at most {MAX_LINE}",
                         hint="type a shorter command")
    try:
        words = shlex.split(line, comments=False)
    except ValueError as exc:
        raise UsageError(f"cannot read that line: {exc}", hint="close the quote") from None
    if not words:
        return None
    name = ALIASES.get(words[0].lower(), words[0].lower())
    cmd = BY_NAME.get(name)
    if cmd is None:
        close = completions(name[:2]) if len(name) >= 2 else []
        raise UsageError(f"unknown command {words[0][:40]!r}",
                         hint=(f"did you mean {' or '.join(close)}? " if close else "")
                         + "type 'help' for the list")
    args = tuple(words[1:])
    if len(args) > cmd.max_args:
        raise UsageError(f"'{cmd.name}' takes {_count(cmd.max_args)}, got {len(args)}",
                         hint=f"usage: {cmd.name} {cmd.usage}".rstrip())
    return Parsed(cmd, args)


def _count(n: int) -> str:
    return "no arguments" if n == 0 else "one argument" if n == 1 else f"{n} arguments"


def completions(prefix: str) -> list[str]:
    """Command names that start with ``prefix``, in table order (readline's tab completion)."""
    p = prefix.lower()
    return [c.name for c in COMMANDS if c.name.startswith(p)]


def allowed(cmd: Command, *, logged_in: bool, open_read_only: bool) -> bool:
    """Whether ``cmd`` may run now: state changes (and ``needs_login``) always need a login;
    read-only commands need one unless the board opens them; help/login/exit never do."""
    if cmd.name in ("help", "login", "logout", "exit"):
        return True
    if cmd.changes_state or cmd.needs_login:
        return logged_in
    return logged_in or open_read_only


def help_text(name: str | None = None, *, width: int = 78) -> str:
    """The command list (or one command's help), wrapped for an 80-column terminal."""
    if name is not None:
        cmd = BY_NAME.get(ALIASES.get(name, name))
        if cmd is None:
            raise UsageError(f"no command {name[:40]!r}", hint="type 'help' for the list")
        lock = ("changes the device: needs a login" if cmd.changes_state
                else "needs a login" if cmd.needs_login else "reads only")
        return f"{cmd.name} {cmd.usage}".rstrip() + f"\n  {cmd.summary}\n  ({lock})"
    lines = []
    for c in COMMANDS:
        mark = "*" if c.changes_state else " "
        lines += textwrap.wrap(c.summary, width, initial_indent=f"{mark} {c.name:<10} ",
                               subsequent_indent=" " * 13)
    lines.append("  (* changes the device and needs a login; 'help COMMAND' for more)")
    return "\n".join(lines)
