"""The controller id read from the device's hardware (``controller_id_file``): one image, many devices."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.fleet_config import CONTROLLER_ID, MAX_CONTROLLER_ID, parse_fleet
from agent.device.fleet_files import MAX_ID_FILE, load_fleet
from agent.errors import ConfigError


def fleet_toml(d: Path, id_line: str) -> Path:
    (d / "fleet.toml").write_text(f'[fleet]\nurl = "http://10.0.2.100:8080"\n{id_line}\n'
                                  'auth = "target"\ntoken = "t0k"\n')
    return d / "agent.toml"  # not there: fleet.toml beside it is read


def test_the_id_is_read_from_the_serial_file(tmp_path: Path) -> None:
    serial = tmp_path / "product_serial"
    serial.write_text("qemu-2\n")  # as sysfs ends it
    cfg = load_fleet(fleet_toml(tmp_path, f'controller_id_file = "{serial}"'))
    assert cfg.controller_id == "qemu-2"
    assert cfg.base_url.endswith("/DEFAULT/controller/v1/qemu-2")


def test_two_devices_of_one_image_get_their_own_ids(tmp_path: Path) -> None:
    ids = []
    for n in (1, 2):
        d = tmp_path / f"dev{n}"
        d.mkdir()
        (d / "serial").write_text(f"SN-{n}\0")  # device-tree serial-number ends in a NUL
        ids.append(load_fleet(fleet_toml(d, 'controller_id_file = "serial"')).controller_id)
    assert ids == ["SN-1", "SN-2"]


@pytest.mark.parametrize("table", [
    {"controller_id": "x", "controller_id_file": "serial"},
    {},
], ids=["both", "neither"])
def test_exactly_one_of_id_and_id_file(tmp_path: Path, table: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="exactly one of controller_id and controller_id_file"):
        parse_fleet({"url": "http://c:1", **table}, tmp_path)


@pytest.mark.parametrize("content", ["", "\n", "To Be Filled By O.E.M.", "../admin", "a/b",
                                     "x" * (MAX_CONTROLLER_ID + 1)])
def test_a_serial_that_is_no_id_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / "serial").write_text(content)
    with pytest.raises(ConfigError, match="not a device id"):
        load_fleet(fleet_toml(tmp_path, 'controller_id_file = "serial"'))


def test_a_missing_serial_file_is_one_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="controller_id_file") as exc:
        load_fleet(fleet_toml(tmp_path, 'controller_id_file = "no-such-serial"'))
    assert "\n" not in str(exc.value) and exc.value.hint


def test_an_oversized_serial_file_is_refused_unread(tmp_path: Path) -> None:
    (tmp_path / "serial").write_bytes(b"a" * (MAX_ID_FILE + 1))
    with pytest.raises(ConfigError, match="not a serial"):
        load_fleet(fleet_toml(tmp_path, 'controller_id_file = "serial"'))


@given(st.text(alphabet=string.printable + "\0\u00e9", max_size=80))
def test_any_serial_yields_a_path_segment_or_a_config_error(content: str) -> None:
    cfg = parse_fleet({"url": "http://c:1", "controller_id_file": "/s"}, Path("/"))
    try:
        cid = cfg.with_controller_id(content).controller_id
    except ConfigError:
        return
    assert CONTROLLER_ID.fullmatch(cid) and len(cid) <= MAX_CONTROLLER_ID
    assert cid == content.strip().strip("\0").strip()
