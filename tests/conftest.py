"""Fixtures build real keys, bundles and sim devices in temporary directories."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from agent.core.config import load
from agent.device.updater import Device, Updater, open_device
from agent.host import bundle_writer, keys, sim
from tests.swtpm import SwTpm, require_swtpm

EDGEOPS = [sys.executable, "-m", "agent.cli"]
COMPATIBLE = "edgeops-sim"


@dataclass
class Keys:
    root: Path
    root_crt: Path
    signer_key: Path
    signer_crt: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    base = tmp_path_factory.mktemp("pki")
    root = keys.init_root(base / "root")
    signer = keys.issue_signer(base / "root", base / "signer")
    return Keys(base / "root", root.cert_path, signer.key_path, signer.cert_path)


def make_image(path: Path, size: int, seed: str) -> Path:
    """Deterministic, partly compressible content: what a rootfs image looks like to zstd."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        block = hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        out += block * (4 if counter % 3 == 0 else 1)
        counter += 1
    path.write_bytes(bytes(out[:size]))
    return path


BundleFactory = Callable[..., Path]


@pytest.fixture
def make_bundle(pki: Keys, tmp_path: Path) -> BundleFactory:
    counter = [0]

    def factory(version: str = "2.0", *, security_version: int = 1, size: int = 300_000,
                compatible: str = COMPATIBLE, compress: bool = False, image: Path | None = None,
                health: dict[str, Any] | None = None, signer: tuple[Path, Path] | None = None,
                build_time: int | None = None, crl: bytes | None = None,
                payload_class: str = "rootfs", block_size: int = 65536) -> Path:
        counter[0] += 1
        img = image or make_image(tmp_path / f"img-{version}-{counter[0]}", size, version)
        key_path, cert_path = signer or (pki.signer_key, pki.signer_crt)
        out = tmp_path / f"v{version}-{counter[0]}.bundle"
        import time

        bundle_writer.create(out, sign=keys.load_signing_key(key_path).sign,
                      chain_pem=cert_path.read_bytes(), compatible=compatible, version=version,
                      security_version=security_version,
                      build_time=build_time if build_time is not None else int(time.time()),
                      sources=[bundle_writer.PayloadSource("rootfs", payload_class, img, compress,
                                                    block_size)],
                      health=health, crl=crl)
        return out

    return factory


@pytest.fixture
def device_dir(pki: Keys, tmp_path: Path) -> Path:
    image = make_image(tmp_path / "v1.img", 300_000, "1.0")
    d = tmp_path / "device"
    sim.init_device(d, image=image, keyring=pki.root_crt, version="1.0", slot_size=1 << 20)
    return d


@pytest.fixture
def device(device_dir: Path) -> Device:
    dev = open_device(load(device_dir / "agent.toml"))
    yield dev  # type: ignore[misc]
    dev.close()


@pytest.fixture
def updater(device: Device) -> Updater:
    return Updater(device, sleep=lambda s: None)


@pytest.fixture
def sw(tmp_path: Path) -> Iterator[SwTpm]:
    """A real swtpm on 127.0.0.1 for one test (skips where swtpm or tpm2-pytss is missing)."""
    require_swtpm()
    s = SwTpm(tmp_path / "tpmstate").start()
    yield s
    s.stop()


@pytest.fixture
def tpm_board(device_dir: Path, sw: SwTpm, pki: Keys) -> Iterator[Updater]:
    """A sim board whose agent.toml points at the swtpm, provisioned like 'edgeops tpm provision'."""
    from agent.adapters.rot import tpm

    toml = device_dir / "agent.toml"
    toml.write_text(toml.read_text() + f'\n[tpm]\ntcti = "{sw.tcti}"\n')
    cfg = load(toml)
    tpm.TpmRoot(tpm.TpmSettings(sw.tcti), cfg.state_dir).provision(pki.root_crt.read_bytes())
    dev = open_device(cfg)
    yield Updater(dev, sleep=lambda s: None)
    dev.close()


def load_script(name: str, path: Path) -> ModuleType:
    """A script that is not a package module (image/build.py, tools/...), imported by path and
    registered as NAME (its dataclasses look their module up in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def run_cli(*args: str | os.PathLike[str], input: bytes | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    raw = subprocess.run([*EDGEOPS, *map(str, args)], input=input, capture_output=True, env=env,
                         timeout=120)
    proc = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(errors="replace"),
                                       raw.stderr.decode(errors="replace"))
    if check and proc.returncode != 0:
        raise AssertionError(f"edgeops {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def slot_sha(path: Path, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def allocated_blocks(path: Path) -> int:
    return os.stat(path).st_blocks
