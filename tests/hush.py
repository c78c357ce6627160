"""A small interpreter for the U-Boot hush subset our boot scripts use, so tests run the real scripts.

Covered: ``;``/newline, ``&&``/``||``, ``# comments``, ``if/elif/else/fi``,
``for X in ...; do ...; done``, '...' (literal) and "..." (``${var}`` expanded)
quoting, and the commands ``setenv``/``env set``, ``test``/``itest``, ``setexpr``
(+ and -, hexadecimal like U-Boot's), ``echo``, ``saveenv``, ``run``, ``source``,
``reset``, ``load``/``fatload`` (succeed), ``booti``/``bootz``/``bootm`` (end the
script: the kernel starts with the current ``bootargs``).
Like U-Boot's hush (which RAUC's documented scripts rely on), the word list of
``for`` is split on whitespace after expansion, even when quoted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_KEYWORDS = {"if", "then", "elif", "else", "fi", "for", "in", "do", "done"}


class Booted(Exception):
    def __init__(self, bootargs: str) -> None:
        super().__init__(bootargs)
        self.bootargs = bootargs


class Reset(Exception):
    pass


class BreakLoop(Exception):
    pass


@dataclass
class Tok:
    kind: str  # word | sep | and | or
    text: str


def tokenize(text: str) -> list[Tok]:
    toks: list[Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t":
            i += 1
        elif c in ";\n":
            toks.append(Tok("sep", c))
            i += 1
        elif text.startswith("&&", i) or text.startswith("||", i):
            toks.append(Tok("and" if c == "&" else "or", text[i:i + 2]))
            i += 2
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        else:
            start = i
            while i < n and text[i] not in " \t;\n" and not text.startswith(("&&", "||"), i):
                if text[i] in "'\"":
                    end = text.find(text[i], i + 1)
                    if end < 0:
                        raise SyntaxError(f"unterminated quote at {i}")
                    i = end + 1
                else:
                    i += 1
            toks.append(Tok("word", text[start:i]))
    return toks


class Hush:
    def __init__(self, env: dict[str, str], save: Callable[[dict[str, str]], None],
                 scripts: dict[str, str]) -> None:
        self.env = env
        self.save = save
        self.scripts = scripts  # `source NAME` runs scripts[NAME]
        self.output: list[str] = []

    # --- expansion -------------------------------------------------------------------------
    def expand(self, word: str) -> str:
        out, i = [], 0
        while i < len(word):
            c = word[i]
            if c == "'":
                end = word.index("'", i + 1)
                out.append(word[i + 1:end])
                i = end + 1
            elif c == '"':
                end = word.index('"', i + 1)
                out.append(self._vars(word[i + 1:end]))
                i = end + 1
            else:
                j = i
                while j < len(word) and word[j] not in "'\"":
                    j += 1
                out.append(self._vars(word[i:j]))
                i = j
        return "".join(out)

    def _vars(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.env.get(m.group(1) or m.group(2), ""), text)

    # --- execution -------------------------------------------------------------------------
    def run(self, text: str) -> bool:
        toks = tokenize(text)
        ok, pos = self._list(toks, 0, set())
        if pos != len(toks):
            raise SyntaxError(f"unexpected {toks[pos].text!r}")
        return ok

    def _list(self, toks: list[Tok], pos: int, stop: set[str], execute: bool = True
              ) -> tuple[bool, int]:
        ok = True
        while pos < len(toks):
            t = toks[pos]
            if t.kind == "sep":
                pos += 1
                continue
            if t.kind == "word" and t.text in stop:
                break
            ok, pos = self._and_or(toks, pos, execute)
        return ok, pos

    def _and_or(self, toks: list[Tok], pos: int, execute: bool) -> tuple[bool, int]:
        ok, pos = self._command(toks, pos, execute)
        while pos < len(toks) and toks[pos].kind in ("and", "or"):
            op = toks[pos].kind
            run_next = execute and (ok if op == "and" else not ok)
            nxt, pos = self._command(toks, pos + 1, run_next)
            if run_next:
                ok = nxt
        return ok, pos

    def _command(self, toks: list[Tok], pos: int, execute: bool) -> tuple[bool, int]:
        head = toks[pos].text
        if head == "if":
            return self._if(toks, pos + 1, execute)
        if head == "for":
            return self._for(toks, pos + 1, execute)
        words = []
        while pos < len(toks) and toks[pos].kind == "word":
            words.append(toks[pos].text)
            pos += 1
        return (self._simple([self.expand(w) for w in words]) if execute else True), pos

    def _expect(self, toks: list[Tok], pos: int, word: str) -> int:
        if pos >= len(toks) or toks[pos].text != word:
            raise SyntaxError(f"expected {word!r}")
        return pos + 1

    def _if(self, toks: list[Tok], pos: int, execute: bool) -> tuple[bool, int]:
        taken = False
        result = True
        cond, pos = self._list(toks, pos, {"then"}, execute)
        pos = self._expect(toks, pos, "then")
        run_body = execute and cond
        ok, pos = self._list(toks, pos, {"elif", "else", "fi"}, run_body)
        if run_body:
            taken, result = True, ok
        while toks[pos].text == "elif":
            cond, pos = self._list(toks, pos + 1, {"then"}, execute and not taken)
            pos = self._expect(toks, pos, "then")
            run_body = execute and not taken and cond
            ok, pos = self._list(toks, pos, {"elif", "else", "fi"}, run_body)
            if run_body:
                taken, result = True, ok
        if toks[pos].text == "else":
            run_body = execute and not taken
            ok, pos = self._list(toks, pos + 1, {"fi"}, run_body)
            if run_body:
                result = ok
        return result, self._expect(toks, pos, "fi")

    def _for(self, toks: list[Tok], pos: int, execute: bool) -> tuple[bool, int]:
        var = toks[pos].text
        pos = self._expect(toks, pos + 1, "in")
        items: list[str] = []
        while toks[pos].kind == "word":
            items += self.expand(toks[pos].text).split()
            pos += 1
        while toks[pos].kind == "sep":
            pos += 1
        body = self._expect(toks, pos, "do")
        _, end = self._list(toks, body, {"done"}, False)
        ok = True
        for item in items if execute else []:
            self.env[var] = item
            try:
                ok, _ = self._list(toks, body, {"done"}, True)
            except BreakLoop:
                break
        return ok, self._expect(toks, end, "done")

    # --- commands --------------------------------------------------------------------------
    def _simple(self, argv: list[str]) -> bool:
        if not argv:
            return True
        cmd, args = argv[0], argv[1:]
        if cmd == "env" and args[:1] == ["set"]:
            cmd, args = "setenv", args[1:]
        if cmd == "setenv":
            if len(args) == 1:
                self.env.pop(args[0], None)
            else:
                self.env[args[0]] = " ".join(args[1:])
            return True
        if cmd in ("test", "itest"):
            return _test(args)
        if cmd == "setexpr":
            name, a, op, b = args
            value = int(a, 16) + (int(b, 16) if op == "+" else -int(b, 16))
            self.env[name] = f"{value & 0xFFFFFFFF:x}"
            return True
        if cmd == "echo":
            self.output.append(" ".join(args))
            return True
        if cmd == "saveenv":
            self.save(dict(self.env))
            return True
        if cmd == "run":
            return all(self.run(self.env.get(name, "")) for name in args)
        if cmd == "source":
            return self.run(self.scripts[args[0] if args else "boot.scr"])
        if cmd == "reset":
            raise Reset()
        if cmd == "break":
            raise BreakLoop()
        if cmd in ("load", "fatload", "ext4load", "fdt", "part"):
            return True
        if cmd in ("booti", "bootz", "bootm"):
            raise Booted(self.env.get("bootargs", ""))
        raise NotImplementedError(f"hush command {cmd!r}")


def _test(args: list[str]) -> bool:
    if args[:1] == ["!"]:
        return not _test(args[1:])
    if len(args) == 2 and args[0] in ("-n", "-z"):
        return bool(args[1]) == (args[0] == "-n")
    if len(args) == 3:
        a, op, b = args
        if op in ("=", "=="):
            return a == b
        if op == "!=":
            return a != b
        numeric = {"-gt": int.__gt__, "-lt": int.__lt__, "-eq": int.__eq__, "-ne": int.__ne__,
                   "-ge": int.__ge__, "-le": int.__le__}
        if op in numeric:  # U-Boot's test parses decimal (simple_strtol base 10)
            return bool(numeric[op](_dec(a), _dec(b)))
    if len(args) == 1:
        return bool(args[0])
    raise NotImplementedError(f"test {' '.join(args)}")


def _dec(text: str) -> int:
    m = re.match(r"-?\d+", text.strip())
    return int(m.group()) if m else 0
