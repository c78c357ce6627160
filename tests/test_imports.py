"""The device-side import stays lean: no server, test or optional heavy dependencies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BundleFactory

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("pytest", "hypothesis", "flask", "starlette", "uvicorn", "aiohttp", "fastapi",
             "prometheus_client", "tpm2_pytss", "ai_edge_litert", "tflite_runtime", "numpy",
             "psycopg", "agent.controller")


def loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return set(out.split())


def test_cli_and_updater_import_no_server_or_test_dependency() -> None:
    mods = loaded_after("import agent.cli.main, agent.device.updater; agent.cli.main.build_parser()")
    bad = sorted(m for m in mods if m.split(".")[0] in FORBIDDEN or m.startswith("agent.controller"))
    assert not bad, f"device-side import pulls in {bad}"


def test_install_path_does_not_import_requests_or_psutil() -> None:
    mods = loaded_after("import agent.device.updater, agent.adapters.bundle, agent.core.trust")
    assert "requests" not in mods and "psutil" not in mods


def test_version_loads_no_command_and_no_heavy_dependency() -> None:
    mods = loaded_after("from agent.cli import main\ntry:\n    main.main(['--version'])\n"
                        "except SystemExit:\n    pass") - loaded_after("pass")
    heavy = ("cryptography", "requests", "urllib3", "zstandard", "sqlite3", "psutil", "tomllib",
             "logging", "importlib.metadata", "agent.adapters", "agent.device", "agent.host")
    bad = sorted(m for m in mods if m.startswith(heavy) or m.startswith("agent.cli."))
    bad = [m for m in bad if m != "agent.cli.main"]
    assert not bad, f"'edgeops --version' imports {bad}"


def test_status_loads_only_the_device_commands(device_dir: Path) -> None:
    mods = loaded_after("from agent.cli import main\n"
                        f"main.main(['status', '--config', {str(device_dir / 'agent.toml')!r}])")
    groups = sorted(m for m in mods if m.startswith("agent.cli.") and m.endswith("_cmd"))
    assert groups == ["agent.cli.device_cmd"]
    assert not {"requests", "urllib3", "psutil", "agent.host.keys", "agent.device.fleet"} & mods


def test_status_loads_no_crypto_no_codec_and_only_the_configured_bootloader(device_dir: Path) -> None:
    """What only an install, a health run or a TPM needs stays out of 'edgeops status'."""
    mods = loaded_after("from agent.cli import main\n"
                        f"main.main(['status', '--config', {str(device_dir / 'agent.toml')!r}])")
    # hashlib is needed now: status checks the journal against its MAC'd witness ([hardening]).
    unused = ("cryptography", "zstandard", "agent.adapters.bundle", "agent.adapters.rot.keystore",
              "agent.adapters.rot.tpm",
              "agent.adapters.probes", "agent.adapters.slots", "agent.adapters.truststore",
              "agent.core.trust", "agent.core.plan", "agent.adapters.bootloader.grub",
              "agent.adapters.bootloader.rpi_tryboot", "agent.adapters.bootloader.uboot_rauc")
    assert not {m for m in mods if m.startswith(unused)}
    assert "agent.adapters.bootloader.uboot" in mods  # the sim board's backend


def test_status_reads_without_the_updater_or_the_transition_table(device_dir: Path) -> None:
    """status only reads: it needs the state record, not the machine that moves it."""
    mods = loaded_after("from agent.cli import main\n"
                        f"main.main(['status', '--config', {str(device_dir / 'agent.toml')!r}])")
    assert "agent.core.state" in mods
    assert not {"agent.device.updater", "agent.core.lifecycle", "subprocess"} & mods


def test_an_unknown_bootloader_still_lists_every_backend() -> None:
    import pytest

    from agent.adapters import bootloader
    from agent.errors import ConfigError

    assert set(bootloader.BUILTIN) <= set(bootloader.names())
    with pytest.raises(ConfigError) as info:
        bootloader.create("lilo", {}, ROOT, ("A", "B"))
    assert all(name in str(info.value.hint) for name in bootloader.BUILTIN)


def test_version_loads_no_typing() -> None:
    """typing is 3 ms of a --version that should cost little more than Python itself."""
    mods = loaded_after("from agent.cli import main\ntry:\n    main.main(['--version'])\n"
                        "except SystemExit:\n    pass") - loaded_after("pass")
    assert "typing" not in mods


def test_status_loads_no_logging_and_no_dataclasses(device_dir: Path) -> None:
    """status sets up no logging (nothing it loads logs) and builds no dataclass: each costs a
    slow core start-up time (tools/bench/startup.py)."""
    mods = loaded_after("from agent.cli import main\n"
                        f"main.main(['status', '--config', {str(device_dir / 'agent.toml')!r}])")
    assert not {"logging", "dataclasses"} & mods


@pytest.mark.parametrize("compress", [False, True])
def test_an_install_loads_no_cryptography(device_dir: Path, make_bundle: BundleFactory,
                                          compress: bool) -> None:
    """The install judges its chain with agent.core.certs and the libcrypto hashlib has
    loaded; cryptography's ~10 MiB and ~30 ms stay out (docs/performance.md section 7)."""
    bundle = make_bundle(compress=compress)
    mods = loaded_after("from agent.cli import main\ntry:\n"
                        f"    main.main(['install', {str(bundle)!r}, '--config', "
                        f"{str(device_dir / 'agent.toml')!r}, '--progress', 'never'])\n"
                        "except SystemExit as e:\n    assert not e.code, e.code")
    assert "agent.core.trust" in mods and "agent.core.ed25519" in mods  # it did judge the head
    assert not {m for m in mods if m.split(".")[0] == "cryptography"}


@pytest.mark.parametrize("compress", [False, True])
def test_an_install_that_logs_nothing_loads_no_logging(device_dir: Path, make_bundle: BundleFactory,
                                                       compress: bool) -> None:
    """logging and what it pulls in cost a 64 MiB install ~10 ms (docs/performance.md section
    8); its loggers (agent.core.logs) load it only for a first record."""
    bundle = make_bundle(compress=compress)
    mods = loaded_after("from agent.cli import main\n"
                        f"code = main.main(['install', {str(bundle)!r}, '--config', "
                        f"{str(device_dir / 'agent.toml')!r}, '--progress', 'never'])\n"
                        "assert code == 0, code")
    assert "agent.device.updater" in mods and "agent.core.logs" in mods
    assert "logging" not in mods


def test_a_verbose_install_sets_up_logging_before_it_starts(device_dir: Path,
                                                          make_bundle: BundleFactory) -> None:
    """-v asks for debug records, libraries' too: logging is configured at once."""
    bundle = make_bundle()
    mods = loaded_after("from agent.cli import main\n"
                        f"code = main.main(['-v', 'install', {str(bundle)!r}, '--config', "
                        f"{str(device_dir / 'agent.toml')!r}, '--progress', 'never'])\n"
                        "import logging\nassert logging.getLogger().level == logging.DEBUG\n"
                        "assert code == 0, code")
    assert "logging" in mods
