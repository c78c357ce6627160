"""Per-slot fix-ups, the pure part (agent.core.fixups): declarations, edits, board files."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import boardfile, config, fixups
from agent.core.fixups import Fixup, parse_fixups
from agent.core.plan import plan_install
from agent.errors import ConfigError, EdgeopsError, SlotError

ROOT = Path(__file__).resolve().parent.parent
SLOTS = ("A", "B")
CLASSES = ("boot", "rootfs")


def decl(**over: object) -> dict[str, object]:
    d: dict[str, object] = {"payload": "boot", "file": "cmdline.txt", "format": "cmdline",
                            "set": {"A": {"root": "/dev/sda2", "edgeops.slot": "A"},
                                    "B": {"root": "/dev/sda3", "edgeops.slot": "B"}}}
    d.update(over)
    return d


def parse(*docs: dict[str, object]) -> tuple[Fixup, ...]:
    return parse_fixups(list(docs), "board.toml", slots=SLOTS, classes=CLASSES)


# --- declarations ---------------------------------------------------------------------------
def test_a_declaration_gives_each_slot_its_pairs_in_order() -> None:
    (f,) = parse(decl())
    assert f.pairs("B") == (("root", "/dev/sda3"), ("edgeops.slot", "B"))
    assert f.access == "mount"


@pytest.mark.parametrize("over, word", [
    ({"payload": "app"}, "payload"),
    ({"format": "ini"}, "format"),
    ({"access": "ftp"}, "access"),
    ({"file": "/cmdline.txt"}, "relative"),
    ({"file": "../rootfs/etc/fstab"}, "inside"),
    ({"file": "a/../../b"}, "inside"),
    ({"file": "a//b"}, "inside"),
    ({"file": "./cmdline.txt"}, "inside"),
    ({"file": "a\\b"}, "relative"),
    ({"file": "x" * 300}, "relative path"),
    ({"file": "/".join("d" * 9)}, "inside"),
    ({"file": "cmd line.txt"}, "inside"),
    ({"set": {"A": {"root": "/dev/sda2"}}}, "each slot"),
    ({"set": {"A": {"root": "/dev/x"}, "B": {"rootfs": "/dev/y"}}}, "same keys"),
    ({"set": {"A": {"root": "/dev/x"}, "B": {"root": "/dev/x"}}}, "tell the slots apart"),
    ({"set": {"A": {"root": "a b"}, "B": {"root": "c"}}}, "printable"),
    ({"set": {"A": {"root": 'a"b'}, "B": {"root": "c"}}}, "quotes"),
    ({"set": {"A": {"root": ""}, "B": {"root": "c"}}}, "printable"),
    ({"set": {"A": {"ro ot": "a"}, "B": {"ro ot": "c"}}}, "kernel parameter"),
    ({"set": {"A": {}, "B": {}}}, "table"),
    ({"set": {"A": {f"k{i}": "a" for i in range(17)}, "B": {f"k{i}": "b" for i in range(17)}}},
     "at most"),
    ({"format": "fstab", "set": {"A": {"boot": "/dev/a"}, "B": {"boot": "/dev/b"}}}, "mount point"),
    ({"format": "fstab", "set": {"A": {"/a/../b": "/dev/a"}, "B": {"/a/../b": "/dev/b"}}},
     "mount point"),
    ({"hook": "rm -rf /"}, "unknown keys"),
])
def test_a_bad_declaration_is_refused_naming_the_problem(over: dict[str, object], word: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(decl(**over))
    assert word in str(exc.value) and "fixups[0]" in str(exc.value)


def test_more_than_the_bounded_number_of_fixups_is_refused() -> None:
    docs = [decl(file=f"f{i}.txt") for i in range(fixups.MAX_FIXUPS + 1)]
    with pytest.raises(ConfigError, match="at most"):
        parse(*docs)


def test_two_fixups_of_one_file_are_refused() -> None:
    with pytest.raises(ConfigError, match="has a fix-up already"):
        parse(decl(), decl())


def test_fixups_that_are_not_an_array_of_tables_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"\[\[fixups\]\]"):
        parse_fixups({"payload": "boot"}, "b", slots=SLOTS, classes=CLASSES)


# any text: parsed into a normalised relative path that stays inside, or refused by ConfigError
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab./\\-_ +\x00~"), max_size=40))
def test_rel_path_never_leaves_the_filesystem(text: str) -> None:
    try:
        out = fixups.rel_path(text, "w")
    except ConfigError:
        return
    parts = out.split("/")
    assert not out.startswith("/") and ".." not in parts and "." not in parts and "" not in parts
    assert len(out) <= fixups.MAX_PATH and len(parts) <= fixups.MAX_PARTS


values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), min_size=1,
                 max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.fixed_dictionaries({}, optional={
    "payload": st.sampled_from(["boot", "rootfs", "app", 1]),
    "file": st.one_of(values, st.integers()),
    "format": st.sampled_from(["cmdline", "fstab", "x"]),
    "access": st.sampled_from(["mount", "mtools", "y"]),
    "set": st.dictionaries(st.sampled_from(["A", "B", "C"]),
                           st.dictionaries(values, st.one_of(values, st.integers()), max_size=3),
                           max_size=3),
}), max_size=10))
def test_the_parser_accepts_bounded_declarations_or_raises_config_error(docs: list[object]) -> None:
    try:
        out = parse_fixups(docs, "b", slots=SLOTS, classes=CLASSES)
    except ConfigError:
        return
    assert len(out) <= fixups.MAX_FIXUPS
    for f in out:
        assert f.payload in CLASSES and f.format in fixups.FORMATS
        assert {s for s, _ in f.values} == set(SLOTS)
        assert all(len(p) <= fixups.MAX_KEYS for _, p in f.values)


# --- the edits --------------------------------------------------------------------------------
PAIRS_B = (("root", "/dev/sda3"), ("edgeops.slot", "B"))


@pytest.mark.parametrize("before, after", [
    (b"console=serial0,115200 root=/dev/sda2 rootwait edgeops.slot=A\n",
     b"console=serial0,115200 root=/dev/sda3 rootwait edgeops.slot=B\n"),
    (b"console=tty1 rootwait", b"console=tty1 rootwait root=/dev/sda3 edgeops.slot=B\n"),
    (b"root=/dev/x quiet root=/dev/y\r\n", b"root=/dev/sda3 quiet edgeops.slot=B\n"),
    (b"", b"root=/dev/sda3 edgeops.slot=B\n"),
    (b"rootwait  rootfstype=ext4", b"rootwait rootfstype=ext4 root=/dev/sda3 edgeops.slot=B\n"),
])
def test_cmdline_sets_each_key_once_and_keeps_the_other_words(before: bytes, after: bytes) -> None:
    assert fixups.apply("cmdline", before, PAIRS_B, "cmdline.txt") == after


def test_cmdline_of_more_than_one_line_is_refused() -> None:
    with pytest.raises(SlotError, match="more than one line"):
        fixups.apply("cmdline", b"root=/dev/a\nquiet\n", PAIRS_B, "cmdline.txt")


def test_a_file_that_is_not_text_or_too_large_is_refused() -> None:
    with pytest.raises(SlotError, match="UTF-8"):
        fixups.apply("cmdline", b"\xff\xfe", PAIRS_B, "cmdline.txt")
    with pytest.raises(SlotError, match="at most"):
        fixups.apply("cmdline", b"a" * (fixups.MAX_FILE + 1), PAIRS_B, "cmdline.txt")


FSTAB = (b"# static file system information\n"
         b"proc /proc proc defaults 0 0\n"
         b"/dev/mmcblk0p2  /boot/firmware  vfat  defaults,noatime  0  2\n"
         b"PARTLABEL=data /var/lib/edgeops ext4 defaults 0 2\n")


def test_fstab_replaces_only_the_device_of_the_named_mount() -> None:
    out = fixups.apply("fstab", FSTAB, (("/boot/firmware", "/dev/mmcblk0p3"),), "fstab")
    assert out == FSTAB.replace(b"/dev/mmcblk0p2  /boot", b"/dev/mmcblk0p3  /boot")


def test_fstab_without_the_mount_is_refused_naming_it() -> None:
    with pytest.raises(SlotError, match="no entry for /boot/firmware"):
        fixups.apply("fstab", b"proc /proc proc defaults 0 0\n# /dev/x /boot/firmware vfat\n",
                     (("/boot/firmware", "/dev/b"),), "fstab")


line_words = st.lists(st.text(alphabet="abr=ot/.-_0123456789", min_size=1, max_size=10), max_size=8)
pairs_st = st.lists(st.tuples(st.sampled_from(["root", "edgeops.slot", "a.b", "r"]),
                              st.text(alphabet="xyz/=0123", min_size=1, max_size=6)),
                    max_size=4, unique_by=lambda p: p[0]).map(tuple)


@settings(max_examples=300, deadline=None)
@given(line_words, pairs_st)
def test_cmdline_edit_is_idempotent_and_leaves_no_mismatch(words: list[str],
                                                           pairs: tuple[tuple[str, str], ...]) -> None:
    once = fixups.apply("cmdline", " ".join(words).encode(), pairs, "c")
    assert fixups.apply("cmdline", once, pairs, "c") == once
    assert fixups.mismatches("cmdline", once, pairs, "c") == []
    # words of other keys survive, in order
    kept = [w for w in words if w.split("=", 1)[0] not in dict(pairs)]
    assert [w for w in once.decode().split() if w.split("=", 1)[0] not in dict(pairs)] == kept


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["/boot/firmware", "/", "/var/lib/edgeops", "none"]), max_size=6),
       st.text(alphabet="/devmcblk0p123=", min_size=1, max_size=12))
def test_fstab_edit_is_idempotent(mounts: list[str], device: str) -> None:
    text = "".join(f"/dev/old{i} {m} auto defaults 0 0\n" for i, m in enumerate(mounts)).encode()
    pairs = (("/boot/firmware", device),)
    try:
        once = fixups.apply("fstab", text, pairs, "f")
    except SlotError:
        assert "/boot/firmware" not in mounts
        return
    assert fixups.apply("fstab", once, pairs, "f") == once
    assert fixups.mismatches("fstab", once, pairs, "f") == []
    assert len(once.splitlines()) == len(mounts)


def test_mismatches_names_what_the_other_slot_left() -> None:
    a_line = b"console=tty1 root=/dev/sda2 edgeops.slot=A\n"
    assert fixups.mismatches("cmdline", a_line, PAIRS_B, "c") == ["root=/dev/sda3", "edgeops.slot=B"]


# --- board files, agent.toml, the plan -----------------------------------------------------------
@pytest.mark.parametrize("name", ["rpi4", "rpi5", "cm4"])
def test_each_raspberry_pi_board_names_each_slots_own_root_and_boot(name: str) -> None:
    board = boardfile.parse((ROOT / "boards" / f"{name}.toml").read_text(), name)
    by_file = {f.file: f for f in board.fixups}
    rootfs = {s.slot: str(s.device) for s in board.slots if s.cls == "rootfs"}
    boot = {s.slot: str(s.device) for s in board.slots if s.cls == "boot"}
    for slot in board.slot_names:
        assert dict(by_file["cmdline.txt"].pairs(slot)) == {"root": rootfs[slot], "edgeops.slot": slot}
        assert dict(by_file["etc/fstab"].pairs(slot)) == {"/boot/firmware": boot[slot]}


def test_board_config_carries_the_fixups_into_agent_toml(tmp_path: Path) -> None:
    from agent.host.boardconfig import agent_toml

    board = boardfile.parse((ROOT / "boards" / "cm4.toml").read_text(), "cm4")
    text = agent_toml(board)
    assert tomllib.loads(text)["fixups"]
    cfg = config.parse(text, tmp_path / "agent.toml")
    assert cfg.fixups == board.fixups


def test_the_plan_keeps_the_fixups_of_the_classes_the_bundle_writes(tmp_path: Path) -> None:
    from agent.core import health, lifecycle
    from agent.core.manifest import Manifest, Payload

    fixes = parse(decl(), decl(payload="rootfs", file="etc/fstab", format="fstab",
                               set={"A": {"/boot": "/dev/a1"}, "B": {"/boot": "/dev/b1"}}))
    slots = {s: {"rootfs": tmp_path / f"root-{s}", "boot": tmp_path / f"boot-{s}"} for s in SLOTS}
    m = Manifest(compatible="c", version="2", security_version=1, build_time=0,
                 payloads=(Payload("rootfs", "rootfs", 10, "00" * 32, 10, "none", 65536, "00" * 32),))
    plan = plan_install(m, phase=lifecycle.Phase.IDLE, booted="A", primary="A", slots=slots,
                        device_health=health.parse_policy({}), fixups=fixes)
    assert [(f.fixup.file, f.slot, f.device) for f in plan.fixups] == [
        ("etc/fstab", "B", tmp_path / "root-B")]


def test_an_error_from_the_edits_is_one_of_ours() -> None:
    with pytest.raises(EdgeopsError):
        fixups.apply("cmdline", b"\x00\xff", PAIRS_B, "c")


def test_board_check_reports_an_agent_toml_without_the_boards_fixups(tmp_path: Path) -> None:
    from agent.device.boardcheck import check
    from agent.host.boardconfig import agent_toml

    board = boardfile.parse((ROOT / "boards" / "rpi4.toml").read_text(), "rpi4")
    text = agent_toml(board)
    stale = config.parse(text.split("[[fixups]]")[0], tmp_path / "agent.toml")
    fresh = config.parse(text, tmp_path / "agent.toml")

    def about_fixups(cfg: config.AgentConfig) -> list[str]:
        return [p.what for p in check(board, tmp_path, config=cfg) if "[[fixups]]" in p.what]

    assert about_fixups(fresh) == []
    assert len(about_fixups(stale)) == 1
