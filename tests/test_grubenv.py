"""grubenv: byte-exact against the real grub-editenv (grub-common), both directions, plus properties."""

from __future__ import annotations

import shutil
import subprocess
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
