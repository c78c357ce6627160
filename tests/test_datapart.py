"""The agent's state on the board's persistent data partition (agent.device.datapart):
``board check`` names each state path that is elsewhere, and the agent refuses a trial
verdict on a state dir that is not on it. Replicas of a device under tmp_path: a
/proc/self/mountinfo and /dev/disk/by-partlabel links, as the running system has them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.adapters import boardfiles
from agent.core import boardfile, config
from agent.device import boardcheck, datapart
from agent.errors import ConfigError, DeviceError
from agent.host import boardconfig

REPO_BOARDS = (Path(__file__).resolve().parent.parent / "boards",)
ROOT_ON_A = "22 1 254:2 / / rw,relatime shared:1 - ext4 /dev/vda2 rw\n"
DATA = "30 22 254:4 / /var/lib/edgeops rw,nosuid shared:9 - ext4 /dev/vda4 rw\n"
PROC = "23 22 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n"


def replica(root: Path, mountinfo: str) -> None:
    """The x86-64-grub disk as udev links it (vda2/3 slots, vda4 data), and a mount table."""
    for n, label in ((1, "esp"), (2, "rootfs_A"), (3, "rootfs_B"), (4, "data")):
        (root / "dev").mkdir(parents=True, exist_ok=True)
        (root / f"dev/vda{n}").touch()
        link = root / f"dev/disk/by-partlabel/{label}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"../../vda{n}")
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/self/mountinfo").write_text(mountinfo)


def x86_config(tmp_path: Path, **device: str) -> config.AgentConfig:
    board = boardfiles.load("x86-64-grub", REPO_BOARDS)
    text = boardconfig.agent_toml(board, **device)
    path = tmp_path / "etc-agent.toml"
    path.write_text(text)
    return config.parse(text, path)


def test_state_on_the_mounted_data_partition_passes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    replica(root, ROOT_ON_A + PROC + DATA)
    board = boardfiles.load("x86-64-grub", REPO_BOARDS)
    assert datapart.off_data(board, x86_config(tmp_path), root) == []


def test_state_on_the_slot_is_named_with_its_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    replica(root, ROOT_ON_A + PROC)  # the data partition never got mounted
    board = boardfiles.load("x86-64-grub", REPO_BOARDS)
    found = datapart.off_data(board, x86_config(tmp_path), root)
    assert {what for what, _, _ in found} >= {"state_dir (journal)", "identity keys",
                                             "keyring anchors (keystore, TPM blobs)",
                                             "fetched CRLs", "model store", "buffers"}
    assert all("the slot's root filesystem" in where for _, _, where in found)


def test_board_check_lists_state_outside_the_data_partition(tmp_path: Path) -> None:
    root = tmp_path / "root"
    replica(root, ROOT_ON_A + PROC)
    board = boardfiles.load("x86-64-grub", REPO_BOARDS)
    problems = boardcheck.check(board, root, config=x86_config(tmp_path, state_dir="/srv/edgeops"))
    lines = [str(p) for p in problems]
    assert any("is not mounted at /var/lib/edgeops" in ln for ln in lines)
    assert any(ln.startswith("state_dir (journal) /srv/edgeops is on the slot's root filesystem")
               and "fix:" in ln for ln in lines)


def test_board_check_of_an_image_tree_holds_paths_to_the_mount_point(tmp_path: Path) -> None:
    root = tmp_path / "tree"  # no mount table: the paths must lie under [data] mount
    root.mkdir()
    board = boardfiles.load("x86-64-grub", REPO_BOARDS)
    assert datapart.off_data(board, x86_config(tmp_path), root) == []
    found = datapart.off_data(board, x86_config(tmp_path, state_dir="/var/lib/other"), root)
    assert found and all("outside /var/lib/edgeops" in where for _, _, where in found)


def test_the_agent_refuses_a_trial_verdict_off_the_data_partition(tmp_path: Path) -> None:
    root = tmp_path / "root"
    replica(root, ROOT_ON_A + PROC)
    with pytest.raises(DeviceError) as err:
        datapart.require_persistent(x86_config(tmp_path), root)
    line = err.value.one_line()
    assert "\n" not in line and "no trial verdict" in line and "/var/lib/edgeops" in line
    replica_ok = tmp_path / "ok"
    replica(replica_ok, ROOT_ON_A + PROC + DATA)
    datapart.require_persistent(x86_config(tmp_path), replica_ok)  # no error


def test_a_board_without_data_partition_holds_nothing(tmp_path: Path) -> None:
    board = boardfiles.load("sim", REPO_BOARDS)
    assert board.data is None
    assert datapart.off_data(board, x86_config(tmp_path), tmp_path) == []


@pytest.mark.parametrize("text, needle", [
    ('[data]\npartlabel = "data"\n', "needs mount"),
    ('[data]\npartlabel = "data"\nmount = "var/lib"\n', "needs mount"),
    ('[data]\nmount = "/var/lib/edgeops"\n', "exactly one of partlabel"),
])
def test_bad_data_sections_are_config_errors(text: str, needle: str) -> None:
    base = (REPO_BOARDS[0] / "sim.toml").read_text()
    with pytest.raises(ConfigError, match=needle):
        boardfile.parse(base + "\n" + text, "t.toml")


_seg = st.text(alphabet="abcdefgh", min_size=1, max_size=3)
_mpath = st.lists(_seg, max_size=3).map(lambda p: "/" + "/".join(p))


@given(st.lists(_mpath, min_size=1, max_size=6), _mpath)
def test_mount_of_is_the_longest_containing_mount_point(points: list[str], path: str) -> None:
    table = [datapart.Mount("/", "/dev/root")] + [datapart.Mount(p, f"/dev/x{i}")
                                                  for i, p in enumerate(points)]
    m = datapart.mount_of(path, table)
    assert m is not None
    contains = [t for t in table if t.point == "/" or path == t.point or
                path.startswith(t.point + "/")]
    assert len(m.point) == max(len(t.point) for t in contains)
    assert m in contains


def test_mountinfo_escapes_are_read() -> None:
    got = datapart.parse_mountinfo("36 35 98:0 / /mnt/with\\040space rw - ext4 /dev/sdb1 rw\nbad\n")
    assert got == [datapart.Mount("/mnt/with space", "/dev/sdb1")]
