"""grubenv: byte-exact against the real grub-editenv (grub-common), both directions, plus properties."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters.bootloader.bootfs import DirBootFs
from agent.adapters.bootloader.grub import GrubRauc
from agent.core import grubenv
from agent.core.grubenv import GrubEnvError
from agent.errors import BootloaderError


def editenv(*args: str) -> str:
    exe = shutil.which("grub-editenv")
    if exe is None:
        pytest.skip("grub-editenv missing: apt-get install grub-common")
    return subprocess.run([exe, *args], check=True, capture_output=True, text=True).stdout


def listed(path: Path) -> dict[str, str]:
    # grub-editenv list prints name=value with the value unescaped; our values here have no newline
    return dict(line.split("=", 1) for line in editenv(str(path), "list").splitlines())


ENV = {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "1",
       "odd": "back\\slash and = sign", "EO_TRIAL": "B"}


def test_grub_editenv_reads_what_edgeops_writes(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(grubenv.encode(ENV))
    assert len(path.read_bytes()) == 1024
    assert listed(path) == ENV


def test_edgeops_reads_what_grub_editenv_writes(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    editenv(str(path), "create")
    assert path.read_bytes() == grubenv.encode({})  # the empty block, byte for byte
    editenv(str(path), "set", *(f"{k}={v}" for k, v in ENV.items()))
    assert grubenv.decode(path.read_bytes()) == ENV
    assert path.read_bytes() == grubenv.encode(ENV)  # same order, same escaping, same padding
    editenv(str(path), "set", "ORDER=A B", "multi=line1\nline2")
    editenv(str(path), "unset", "B_TRY")
    got = grubenv.decode(path.read_bytes())
    assert got["ORDER"] == "A B" and got["multi"] == "line1\nline2" and "B_TRY" not in got


def test_backend_env_stays_editable_by_grub_editenv(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    editenv(str(path), "create")
    editenv(str(path), "set", "ORDER=A B", "A_OK=1", "A_TRY=0", "B_OK=0", "B_TRY=0", "keep=me")
    bl = GrubRauc(DirBootFs(tmp_path), "grubenv", ("A", "B"))
    assert bl.primary() == "A" and bl.trial() is None
    bl.set_trial("B")
    assert listed(path) | {} == {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1",
                                 "B_TRY": "0", "keep": "me", "EO_TRIAL": "B"}
    assert bl.trial() == "B" and bl.primary() == "A"
    bl.commit("B")
    assert bl.primary() == "B" and bl.trial() is None
    assert listed(path)["ORDER"] == "B A"
    with pytest.raises(BootloaderError):
        bl.mark_bad("B")
    bl.mark_bad("A")
    assert listed(path)["A_OK"] == "0" and bl.primary() == "B"


def test_decode_rejects_broken_blocks() -> None:
    good = grubenv.encode({"a": "1"})
    for bad in (b"", b"# GRUB Environment Block", b"# not grub\n" + good[11:],
                grubenv.HEADER + b"a=1",  # the value runs into the end
                grubenv.HEADER + b"noequals", grubenv.HEADER + b"a=\\"):
        with pytest.raises(GrubEnvError):
            grubenv.decode(bad)
    with pytest.raises(GrubEnvError):
        grubenv.encode({"x": "y" * 1024})
    for name in ("", "#a", "a=b", "a\nb"):
        with pytest.raises(GrubEnvError):
            grubenv.encode({name: "v"})


names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="=#"),
                min_size=1, max_size=10)
values = st.text(st.characters(min_codepoint=1, max_codepoint=0x2FF), max_size=20)


@given(st.dictionaries(names, values, max_size=10))
def test_codec_round_trips(env: dict[str, str]) -> None:
    try:
        block = grubenv.encode(env)
    except GrubEnvError:  # only "does not fit" may refuse a valid env
        need = len(grubenv.HEADER + grubenv.WARNING) + sum(
            len(k.encode()) + len(grubenv._escape(v)) + 2 for k, v in env.items())
        assert need > 1024
        return
    assert len(block) == 1024
    assert grubenv.decode(block) == env


@settings(max_examples=300)
@given(st.binary(max_size=200), st.booleans())
def test_any_bytes_parse_or_raise_grubenv_error(data: bytes, with_header: bool) -> None:
    block = (grubenv.HEADER + data) if with_header else data
    try:
        env = grubenv.decode(block)
    except GrubEnvError:
        return
    assert all("\n" not in k for k in env)


@pytest.mark.parametrize("env, boots, after", [
    ({"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"}, "A", ("1", "0")),
    ({"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "0"}, "B", ("0", "1")),
    # the trial's one boot is spent: B is skipped (and stays tried), A boots
    ({"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "1"}, "A", ("1", "1")),
    # nothing good: TRY of OK slots reset, the first OK slot in ORDER boots (not entry 0);
    # the loop marked A tried as it passed it, as RAUC's script does (harmless: A_OK=0)
    ({"ORDER": "B A", "A_OK": "0", "A_TRY": "0", "B_OK": "1", "B_TRY": "1"}, "B", ("1", "1")),
    ({}, "A", ("1", "1")),  # no variables at all: nothing is OK, entry 0 (RAUC behaviour)
    # nothing bootable, and B is an unconfirmed trial: the committed A boots, never B again
    ({"ORDER": "B A", "A_OK": "1", "A_TRY": "1", "B_OK": "1", "B_TRY": "1", "EO_TRIAL": "B"},
     "A", ("1", "1")),
])
def test_grub_cfg_decisions(tmp_path: Path, env: dict[str, str], boots: str,
                            after: tuple[str, str]) -> None:
    from tests import firmware as fw

    path = tmp_path / "EFI/edgeops/grubenv"  # where boards/x86-64-grub.toml puts it on the ESP
    path.parent.mkdir(parents=True)
    path.write_bytes(grubenv.encode({**env, "other": "kept"}))
    assert fw.Grub(DirBootFs(tmp_path)).boot() == boots
    got = grubenv.decode(path.read_bytes())
    assert (got["A_TRY"], got["B_TRY"]) == after and got["other"] == "kept"
    assert listed(path) == got  # what GRUB saved, grub-editenv reads


# --- power cuts: two copies, each rewritten in place (grub.py) -----------------------------------
class PowerCut(Exception):
    pass


class TornFs:
    """An ESP in memory whose power fails after ``budget`` written bytes.

    An in-place rewrite cut after n bytes leaves the new bytes' prefix over the old ones;
    a whole-file replace cut at any point leaves the file empty (what vfat showed in e2e)."""

    def __init__(self, files: dict[str, bytes], budget: int | None = None) -> None:
        self.files, self.budget, self.written = dict(files), budget, 0

    def read(self, name: str) -> bytes | None:
        return self.files.get(name)

    def _spend(self, n: int) -> int:
        if self.budget is None:
            self.written += n
            return n
        n = max(0, min(n, self.budget - self.written))
        self.written += n
        return n

    def replace(self, name: str, data: bytes) -> None:
        if self._spend(len(data)) < len(data):
            self.files[name] = b""
            raise PowerCut(name)
        self.files[name] = data

    def rewrite(self, name: str, offset: int, data: bytes) -> None:
        old = self.files[name]
        assert len(old) >= offset + len(data), "an in-place write must not grow the file"
        n = self._spend(len(data))
        self.files[name] = old[:offset] + data[:n] + old[offset + n:]
        if n < len(data):
            raise PowerCut(name)


ESP_ENV = "EFI/edgeops/grubenv"
COMMITTED_A = {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"}


def _grub_boots(files: dict[str, bytes]) -> str:
    from tests import firmware as fw
    return fw.Grub(TornFs(files)).boot()


def _torn_runs(files: dict[str, bytes], op: str) -> Iterator[tuple[TornFs, dict[str, str],
                                                                    dict[str, str]]]:
    """For every byte the operation writes, the ESP with the power cut right there."""
    clean = TornFs(files)
    bl = GrubRauc(clean, ESP_ENV, ("A", "B"))
    before = bl.read()
    getattr(bl, op)("B")
    after = bl.read()
    assert clean.written > 2 * 1024  # both copies, in place (plus a repair, if needed)
    for budget in range(clean.written):
        fs = TornFs(files, budget)
        with pytest.raises(PowerCut):
            getattr(GrubRauc(fs, ESP_ENV, ("A", "B")), op)("B")
        yield fs, before, after


@pytest.mark.parametrize("start, op", [
    ("both", "set_trial"), ("both", "commit"), ("both", "mark_bad"),
    ("primary-only", "set_trial"),  # an ESP from before the backup existed
    ("empty-primary", "set_trial"),  # the e2e power cut's leftover: a 0-byte grubenv
])
def test_a_power_cut_at_any_byte_leaves_the_old_or_the_new_state(start: str, op: str) -> None:
    env = COMMITTED_A if op == "set_trial" else {
        **COMMITTED_A, "ORDER": "B A", "B_OK": "1", "B_TRY": "1", "EO_TRIAL": "B"}
    block = grubenv.encode(env)
    files = {"both": {ESP_ENV: block, ESP_ENV + ".b": block},
             "primary-only": {ESP_ENV: block},
             "empty-primary": {ESP_ENV: b"", ESP_ENV + ".b": block}}[start]
    seen = set()
    expected: set[str] = set()
    for fs, before, after in _torn_runs(files, op):
        expected = expected or {_grub_boots({ESP_ENV: grubenv.encode(s)}) for s in (before, after)}
        got = GrubRauc(fs, ESP_ENV, ("A", "B")).read()
        assert got in (before, after), f"torn after {fs.budget} bytes: {got}"
        seen.add(json_key(got))
        # GRUB, running the real grub.cfg, boots what the old or the new state boots
        ok = {_grub_boots(fs.files)}
        assert ok <= expected, f"torn after {fs.budget} bytes: GRUB boots {ok}, not {expected}"
        # and the next write, after the power comes back, succeeds and leaves both copies valid
        again = GrubRauc(TornFs(fs.files), ESP_ENV, ("A", "B"))
        if op != "mark_bad" or again.primary() != "B":
            getattr(again, op)("B")
            assert again.read() == after
            assert {grubenv.decode(again.fs.read(n) or b"") == after
                    for n in (ESP_ENV, ESP_ENV + ".b")} == {True}
    assert seen == {json_key(before), json_key(after)}  # both outcomes do occur


def json_key(env: dict[str, str]) -> str:
    return json.dumps(env, sort_keys=True)


def test_a_zero_length_primary_falls_back_to_the_backup(tmp_path: Path) -> None:
    esp = tmp_path / "EFI/edgeops"
    esp.mkdir(parents=True)
    trial = {**COMMITTED_A, "ORDER": "B A", "B_OK": "1", "EO_TRIAL": "B"}
    (esp / "grubenv").write_bytes(b"")
    (esp / "grubenv.b").write_bytes(grubenv.encode(trial))
    bl = GrubRauc(DirBootFs(tmp_path), ESP_ENV, ("A", "B"))
    assert bl.read() == trial and bl.trial() == "B" and bl.primary() == "A"
    from tests import firmware as fw
    assert fw.Grub(DirBootFs(tmp_path)).boot() == "B"  # the trial's one boot, from the backup
    assert (esp / "grubenv").read_bytes() == b""  # GRUB's save_env leaves the bad copy alone
    assert grubenv.decode((esp / "grubenv.b").read_bytes())["B_TRY"] == "1"
    assert fw.Grub(DirBootFs(tmp_path)).boot() == "A"  # trial spent: the committed slot
    bl.mark_bad("B")  # the agent's next write repairs the primary
    assert listed(esp / "grubenv") == listed(esp / "grubenv.b") == bl.read()
    assert bl.read()["B_OK"] == "0"


def test_copies_are_rewritten_in_place_not_replaced(tmp_path: Path) -> None:
    esp = tmp_path / "EFI/edgeops"
    esp.mkdir(parents=True)
    for name in ("grubenv", "grubenv.b"):
        (esp / name).write_bytes(grubenv.encode(COMMITTED_A))
    inodes = {n: (esp / n).stat().st_ino for n in ("grubenv", "grubenv.b")}
    bl = GrubRauc(DirBootFs(tmp_path), ESP_ENV, ("A", "B"))
    bl.set_trial("B")
    assert {n: (esp / n).stat().st_ino for n in inodes} == inodes  # same files: no rename
    assert {(esp / n).stat().st_size for n in inodes} == {1024}
    assert listed(esp / "grubenv") == listed(esp / "grubenv.b") == bl.read()
    assert bl.trial() == "B"


def test_neither_copy_valid_is_an_error_naming_both(tmp_path: Path) -> None:
    fs = TornFs({ESP_ENV: b"", ESP_ENV + ".b": b"!" + grubenv.encode(COMMITTED_A)[1:]})
    with pytest.raises(GrubEnvError, match=r"grubenv\.b"):
        GrubRauc(fs, ESP_ENV, ("A", "B")).read()


def test_grub_refuses_a_copy_caught_mid_rewrite(tmp_path: Path) -> None:
    # GRUB's own envblk.c (grub-editenv shares it with load_env): no signature, no block
    path = tmp_path / "grubenv"
    path.write_bytes(b"!" + grubenv.encode(COMMITTED_A)[1:])
    exe = shutil.which("grub-editenv")
    if exe is None:
        pytest.skip("grub-editenv missing: apt-get install grub-common")
    r = subprocess.run([exe, str(path), "list"], capture_output=True, text=True)
    assert r.returncode != 0 and "invalid environment block" in r.stderr
