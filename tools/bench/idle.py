#!/usr/bin/env python3
"""Idle cost of the agent service: CPU, memory and disk writes of `edgeops agent` with nothing to do.

Starts a controller on 127.0.0.1 over HTTPS (a throwaway CA, as in the tests), two sim
devices and `edgeops agent` on each: one polling that controller (TargetToken over TLS,
long-poll on, the controller's default 30 s poll sleep), one without [fleet]. After they
settle it samples, over the same --seconds window, their CPU time, RSS (the agent and any
child processes it has: a worker, should one run) and bytes written to disk, next to a
baseline measured in the same run: a Python process that only sleeps (the floor for any
Python daemon). Target (issue 10): the agent with fleet polling <= 24 MiB RSS, ~0 % CPU,
no writes. The service's start (its first worker: cycle and poll) falls in --settle.

``agent/`` is byte-compiled first, as an installed package is: a process that compiles its
modules from source (PYTHONDONTWRITEBYTECODE=1 in a checkout) keeps the compiler's memory.
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import ipaddress
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TARGET_RSS = 24.0  # MiB


def edgeops(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *map(str, args)]


@dataclass
class Usage:
    cpu: float  # seconds, user + sys, the process and its children
    rss: float  # MiB, the process and its children
    written: int  # bytes the process and its children wrote to storage


def usage(pid: int) -> Usage:
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    cpu = rss = 0.0
    written = 0
    for p in procs:
        try:
            t = p.cpu_times()
            cpu += t.user + t.system
            rss += p.memory_info().rss / 2**20
            written += p.io_counters().write_bytes
        except psutil.NoSuchProcess:
            continue  # a child that ended meanwhile
    return Usage(cpu, rss, written)


def tls_material(d: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1, server key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(cn: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey,
             *, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench ca")]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = d / "ca.crt", d / "server.crt", d / "server.key"
    paths[0].write_bytes(cert("bench ca", ca_key, ca_key, ca=True).public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert("127.0.0.1", key, ca_key, ca=False).public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def sim_device(work: Path, name: str) -> Path:
    run = {"check": True, "stdout": subprocess.DEVNULL, "cwd": ROOT}
    subprocess.run(edgeops("sim", "init", work / name, "--image", work / "v1.img",  # type: ignore[call-overload]
                           "--keyring", work / "root/root.crt"), **run)
    return work / name / "agent.toml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--settle", type=float, default=4.0, help="seconds for start-up and first polls")
    a = ap.parse_args()
    compileall.compile_dir(ROOT / "agent", quiet=1)  # as installed (see the docstring)
    import ssl

    from agent.host.simfleet import start_controller

    work = Path(tempfile.mkdtemp(prefix="edgeops-idle-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ctl = None
    try:
        subprocess.run(edgeops("keys", "init-root", "--out", work / "root"), check=True,
                       stdout=subprocess.DEVNULL, cwd=ROOT)
        (work / "v1.img").write_bytes(b"x" * 4096)
        ca, crt, key = tls_material(work)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
        ctl = start_controller(work / "controller", ssl_context=ctx, tick_interval=3600)
        token = ctl.api("POST", "/devices", {"id": "idle-1"}, verify=str(ca))["token"]
        fleet_cfg = sim_device(work, "fleet")
        with open(fleet_cfg, "a") as f:
            f.write(f'\n[fleet]\nurl = "{ctl.url}"\ncontroller_id = "idle-1"\nauth = "target"\n'
                    f'token = "{token}"\nca_cert = "{ca}"\n')
        alone_cfg = sim_device(work, "alone")
        out = subprocess.DEVNULL
        procs["edgeops agent, fleet (TLS)"] = subprocess.Popen(
            edgeops("agent", "--config", fleet_cfg), cwd=ROOT, stdout=out)
        procs["edgeops agent, no fleet"] = subprocess.Popen(
            edgeops("agent", "--config", alone_cfg), cwd=ROOT, stdout=out)
        procs["python sleeping"] = subprocess.Popen(
            [sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
        time.sleep(a.settle)  # start-up, the first cycle and the first polls are not idle
        for name, p in procs.items():
            if p.poll() is not None:
                raise SystemExit(f"{name} exited early ({p.returncode})")
        before = {name: usage(p.pid) for name, p in procs.items()}
        time.sleep(a.seconds)
        after = {name: usage(p.pid) for name, p in procs.items()}
        seen = ctl.api("GET", "/devices", verify=str(ca))["devices"][0].get("last_seen")
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:  # report it, and do not leave it running
                print(f"{p.args!r} ignored SIGTERM for 15 s", file=sys.stderr)
                p.kill()
                p.wait()
        if ctl is not None:
            ctl.stop()
        shutil.rmtree(work, ignore_errors=True)
    if not seen:
        raise SystemExit("the fleet agent never reached the controller")
    report(before, after, a.seconds)
    return 0


def report(before: dict[str, Usage], after: dict[str, Usage], seconds: float) -> None:
    print(f"# idle over {seconds:g} s (sim poll interval 5 s; the fleet agent long-polls the "
          f"controller over HTTPS, poll sleep 30 s)")
    print(f"{'':<28} {'CPU %':>7} {'RSS MiB':>8} {'written KiB':>12}")
    rows = {}
    for name in after:
        cpu = 100 * (after[name].cpu - before[name].cpu) / seconds
        written = (after[name].written - before[name].written) / 1024
        rows[name] = (cpu, after[name].rss, written)
        print(f"{name:<28} {cpu:>7.3f} {after[name].rss:>8.1f} {written:>12.1f}")
    for name, (cpu, rss, written) in rows.items():
        key = name.replace("edgeops agent, ", "edgeops_agent_").replace("python sleeping", "python_sleep")
        key = key.replace(" (TLS)", "").replace(" ", "_")
        print(f"{key}_idle_cpu {cpu:.3f} %\n{key}_idle_rss {rss:.1f} MiB\n"
              f"{key}_idle_written {written:.1f} KiB")
    cpu, rss, written = rows["edgeops agent, fleet (TLS)"]
    verdict = "ok" if rss <= TARGET_RSS else "over"
    print(f"target: agent with fleet polling <= {TARGET_RSS:g} MiB RSS: {verdict} ({rss:.1f} MiB; "
          f"a sleeping Python {rows['python sleeping'][1]:.1f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
