"""Run boards/grub/grub.cfg: the GRUB script subset it uses, on top of tests/hush.py.

Adds GRUB's ``set X=Y`` and ``X=Y`` assignments, ``[ ... ]`` tests with ``-a``,
``load_env --file F`` / ``save_env --file F VAR...`` (only the named variables
change in the file, written in place, as GRUB's save_env does; both fail, changing
nothing, on a missing file or a block without GRUB's signature, as
grub-core/commands/loadenv.c does) and ``menuentry "title" { ... }``
(recorded, not run). Booting = the entry ``$default`` names.
"""

from __future__ import annotations

from agent.adapters.bootloader.bootfs import BootFs, write_in_place
from agent.core import grubenv
from tests import hush


class GrubScript(hush.Hush):
    def __init__(self, fs: BootFs) -> None:
        super().__init__({}, lambda env: None, {})
        self.fs = fs
        self.entries: list[str] = []

    def _command(self, toks: list[hush.Tok], pos: int, execute: bool) -> tuple[bool, int]:
        if toks[pos].text == "menuentry":
            title = self.expand(toks[pos + 1].text)
            pos = self._expect(toks, pos + 2, "{")
            while toks[pos].text != "}":
                pos += 1
            if execute:
                self.entries.append(title)
            return True, pos + 1
        return super()._command(toks, pos, execute)

    def _file(self, path: str) -> str:
        return path.split(")/", 1)[-1].lstrip("/")  # ($root)/grub/grubenv -> grub/grubenv

    def _simple(self, argv: list[str]) -> bool:
        if not argv:
            return True
        cmd = argv[0]
        if cmd == "set" or ("=" in cmd and not cmd.startswith("=")):
            for a in argv[1:] if cmd == "set" else argv:
                name, _, value = a.partition("=")
                self.env[name] = value
            return True
        if cmd == "[":
            assert argv[-1] == "]", argv
            terms: list[list[str]] = []
            cur: list[str] = []
            for a in argv[1:-1]:
                if a == "-a":
                    terms.append(cur)
                    cur = []
                else:
                    cur.append(a)
            terms.append(cur)
            return all(hush._test(t) for t in terms)
        if cmd == "load_env":
            data = self.fs.read(self._file(argv[argv.index("--file") + 1]))
            if data is None or not data.startswith(grubenv.HEADER):
                return False  # "file not found" / "invalid environment block"
            self.env.update(grubenv.decode(data))
            return True
        if cmd == "save_env":
            i = argv.index("--file")
            name = self._file(argv[i + 1])
            data = self.fs.read(name)
            if data is None or not data.startswith(grubenv.HEADER):
                return False
            stored = grubenv.decode(data)
            stored.update({v: self.env.get(v, "") for v in argv[i + 2:]})
            write_in_place(self.fs, name, 0, grubenv.encode(stored, len(data)))
            return True
        return super()._simple(argv)

    def boot(self, script: str) -> str:
        self.run(script)
        title = self.entries[int(self.env.get("default", "0"))]
        return title.split()[1]  # "Slot A (OK=.. TRY=..)"
