"""The console's terminal: plain lines or readline, colour only where TERM has it, no echo for secrets.

Plain on a dumb terminal or anything that is not a tty (TERM unset, ``dumb``, ``unknown``):
no colour, no cursor movement, progress as whole lines. readline editing, history and tab
completion of command names on any other tty, with bracketed paste off (readline >= 8.1
wraps each prompt in escapes a simple terminal prints as junk). A read that the terminal
cannot finish (end of input, EIO after a hangup) is ``Hangup``; a write that cannot is
dropped, and the session ends at its next read.
"""

from __future__ import annotations

import os
import sys
import termios
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any

from agent.core import console_commands

MAX_INPUT = 8192  # characters read for one line (a pasted answer fits)
PROGRESS_STEP = 0.1
_COLOUR_TERMS = ("xterm", "ansi", "linux", "screen", "tmux", "rxvt", "color")


class Hangup(Exception):
    """The terminal went away (SIGHUP) or input ended."""


class Terminal:
    """Input and output of one session; plain unless the terminal allows more."""

    def __init__(self, inp: IO[str], out: IO[str]) -> None:
        self.inp, self.out = inp, out
        term = os.environ.get("TERM", "")
        self.tty = inp.isatty() and out.isatty()
        self.plain = not self.tty or term in ("", "dumb", "unknown")
        # colour only where the terminal type has it (a vt220, the serial unit's default, has not)
        self.colour = (not self.plain and "NO_COLOR" not in os.environ
                       and any(t in term for t in _COLOUR_TERMS))
        self.readline: Any = None
        self.reading = False  # blocked waiting for a line: a hangup may end the wait at once
        if not self.plain and inp is sys.stdin and out is sys.stdout:
            try:
                import readline

                readline.set_completer(self._complete)
                readline.set_completer_delims(" ")
                readline.parse_and_bind("tab: complete")
                # readline >= 8.1 wraps every prompt in bracketed-paste escapes: a terminal
                # that does not know them shows them as junk, and a pasted answer needs none
                readline.parse_and_bind("set enable-bracketed-paste off")
                self.readline = readline
            except ImportError:  # a Python built without readline: plain lines still work
                pass

    def _complete(self, text: str, state: int) -> str | None:
        hits = console_commands.completions(text)
        return hits[state] + " " if state < len(hits) else None

    def write(self, text: str = "") -> None:
        try:
            self.out.write(text + "\n")
            self.out.flush()
        except OSError:  # the line dropped (EIO after a hangup): the session ends at the next read
            pass

    def emph(self, text: str, colour: str = "1") -> str:
        return f"\033[{colour}m{text}\033[0m" if self.colour else text

    def read(self, prompt: str, *, secret: bool = False) -> str:
        self.reading = True
        try:
            return self._read(prompt, secret)
        finally:
            self.reading = False

    def _read(self, prompt: str, secret: bool) -> str:
        if self.readline is not None and not secret:
            try:
                line = input(prompt)
            except EOFError:
                raise Hangup("end of input") from None
            return line[:MAX_INPUT]
        try:
            self.out.write(prompt)
            self.out.flush()
        except OSError:
            raise Hangup("terminal gone") from None
        with self._no_echo(secret):
            try:
                line = self.inp.readline(MAX_INPUT)
            except OSError:
                raise Hangup("terminal gone") from None
        if secret:
            self.write()
        if not line:
            raise Hangup("end of input")
        return line.rstrip("\r\n")

    @contextmanager
    def _no_echo(self, secret: bool) -> Iterator[None]:
        if not (secret and self.inp.isatty()):
            yield
            return
        fd = self.inp.fileno()
        old = termios.tcgetattr(fd)
        new = list(old)
        new[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSAFLUSH, new)
        try:
            yield
        finally:
            with suppress(termios.error):
                termios.tcsetattr(fd, termios.TCSAFLUSH, old)


class Progress:
    """Progress as whole lines every 10 % (a dumb terminal has no carriage-return redraw)."""

    def __init__(self, term: Terminal) -> None:
        self.term, self.next = term, PROGRESS_STEP

    def __call__(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        while frac >= self.next - 1e-9 and self.next <= 1.0 + 1e-9:
            self.term.write(f"  {self.next:4.0%} written")
            self.next += PROGRESS_STEP
