"""The DDI client and fleet agent against real loopback HTTP servers and sim devices.

Every device scenario ends with the new version committed or the old one intact and running,
and the server's view (closed success/failure) matches the device's.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.ddi_http import DdiClient
from agent.adapters.journal import Journal
from agent.core.config import load
from agent.core.fleet_config import DownloadPolicy, FleetConfig
from agent.core.outbox import MODEL_KIND, Backoff
from agent.device.fleet import FleetAgent, PollOutcome
from agent.device.fleet_files import load_fleet
from agent.device.push import LongPoll
from agent.device.updater import Updater, open_device
from agent.errors import TransportError
from agent.host.sim import SimFirmware
from tests.conftest import BundleFactory
from tests.fakeddi import Action, FakeDdi
from tests.faultproxy import Fault, FaultProxy

FIX = Path(__file__).parent / "fixtures" / "ddi"
TOKEN = "tok-not-logged"
BAD_HEALTH = {"deadline": 2, "interval": 0.1, "retries": 1,
              "probe": [{"type": "tcp", "host": "127.0.0.1", "port": 9, "timeout": 0.2}]}


# --- contract: hawkBit's documented documents through the client's HTTP path ---------------
class _Docs(BaseHTTPRequestHandler):
    routes: dict[str, str] = {
        "/TENANT_ID/controller/v1/CONTROLLER_ID": "base_deployment.json",
        "/TENANT_ID/controller/v1/CONTROLLER_ID/deploymentBase/3": "deployment_base.json",
        "/TENANT_ID/controller/v1/CONTROLLER_ID/cancelAction/5": "cancel_action.json",
    }
    seen: list[dict[str, str]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append(dict(self.headers))
        name = self.routes.get(self.path.split("?")[0])
        if name is None:
            self.send_response(404)
            self.end_headers()
            return
        host = f"http://127.0.0.1:{self.server.server_address[1]}"  # type: ignore[index]
        body = (FIX / name).read_text().replace("https://ddi-api.host.com", host).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/hal+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("auth,scheme", [("target", "TargetToken"), ("gateway", "GatewayToken")])
def test_contract_documented_shapes_through_the_client(auth: str, scheme: str) -> None:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Docs)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Docs.seen = []
    try:
        cfg = FleetConfig(url=f"http://127.0.0.1:{srv.server_address[1]}", tenant="TENANT_ID",
                          controller_id="CONTROLLER_ID", auth=auth, token=TOKEN)
        client = DdiClient(cfg)
        base = client.poll().base
        assert base is not None and base.sleep == 43200 and base.deployment is not None
        dep = client.deployment(base.deployment)
        assert dep.action_id == "8" and dep.may_install_now and len(dep.artifacts()) == 2
        cancel = client.cancel(base.deployment.replace("deploymentBase/3", "cancelAction/5"))
        assert cancel.stop_id == "5"
        assert {h["Authorization"] for h in _Docs.seen} == {f"{scheme} {TOKEN}"}
    finally:
        srv.shutdown()
        srv.server_close()


# --- a sim device running the agent loop ------------------------------------------------------
@pytest.fixture
def fake() -> Iterator[FakeDdi]:
    f = FakeDdi(token=TOKEN)
    yield f
    f.close()


def fleet_cfg(url: str, **kw: Any) -> FleetConfig:
    return FleetConfig(url=url, controller_id="dev1", auth="target", token=TOKEN, min_sleep=0,
                       download=kw.pop("download", DownloadPolicy(read_timeout=1, backoff=0.01)),
                       **kw)


def service(device_dir: Path, url: str, **kw: Any) -> PollOutcome:
    """What `edgeops agent` does on each wake-up: finish boot/trial work, then one fleet poll."""
    while True:
        dev = open_device(load(device_dir / "agent.toml"))
        try:
            up = Updater(dev, sleep=lambda s: None)
            if up.cycle().rebooted:
                continue  # the sim firmware already booted again: the service restarts
            agent = FleetAgent(up, DdiClient(fleet_cfg(url, **kw)), sleep=lambda s: None,
                               backoff=Backoff(base=0.01, cap=0.01, rng=random.Random(0)))
            return agent.poll_once()
        finally:
            dev.close()


def running(device_dir: Path) -> tuple[str, str | None, str]:
    dev = open_device(load(device_dir / "agent.toml"))
    try:
        st = Updater(dev).status()
        slot = st["booted_slot"]
        return slot, st["slots"][slot]["version"], st["phase"]
    finally:
        dev.close()


def drive(device_dir: Path, url: str, fake: FakeDdi, aid: str, limit: int = 8,
          **kw: Any) -> list[PollOutcome]:
    outs = []
    for _ in range(limit):
        outs.append(service(device_dir, url, **kw))
        a = next(x for x in fake.actions if x.id == aid)
        if a.closed is not None or a.canceled:
            break
    return outs


def test_success_is_reported_only_after_the_trial_commits(
        device_dir: Path, make_bundle: BundleFactory, fake: FakeDdi) -> None:
    fake.deploy(Action("11", make_bundle("2.0").read_bytes()))
    first = service(device_dir, fake.url)
    assert first.rebooted
    # written and rebooted into the trial: the server knows 'downloaded', not success
    assert fake.executions("11")[-1] == "downloaded/none"
    assert fake.actions[0].closed is None
    assert running(device_dir)[0] == "B" and running(device_dir)[2] != "idle"
    drive(device_dir, fake.url, fake, "11")
    assert fake.actions[0].closed == "success"
    assert running(device_dir) == ("B", "2.0", "idle")
    ex = fake.executions("11")
    assert ex[0] == "proceeding/none" and ex[-1] == "closed/success" and ex.count("closed/success") == 1


def test_failed_trial_reports_failure_and_old_version_runs(
        device_dir: Path, make_bundle: BundleFactory, fake: FakeDdi) -> None:
    fake.deploy(Action("12", make_bundle("2.0", health=BAD_HEALTH).read_bytes()))
    drive(device_dir, fake.url, fake, "12")
    assert fake.actions[0].closed == "failure"
    assert running(device_dir) == ("A", "1.0", "idle")
    detail = fake.feedback[-1][1]["status"]["details"][0]
    assert "did not pass its trial" in detail


def test_faults_on_every_path_still_commit(
        device_dir: Path, make_bundle: BundleFactory, fake: FakeDdi) -> None:
    proxy = FaultProxy(fake.address, [
        Fault("http503"), Fault("drop", after=20_000), Fault("truncate", after=70_000),
        Fault("stall", after=120_000, seconds=2), Fault("http503"), Fault("drop", after=250_000),
    ])
    fake.public_url = proxy.url
    try:
        fake.deploy(Action("13", make_bundle("2.0").read_bytes()))
        outs = drive(device_dir, proxy.url, fake, "13", limit=12)
        assert proxy.applied  # faults really happened
        assert fake.actions[0].closed == "success", [o.messages for o in outs]
        assert running(device_dir) == ("B", "2.0", "idle")
    finally:
        proxy.close()


def test_reports_wait_offline_and_arrive_in_order_once(
        device_dir: Path, make_bundle: BundleFactory, fake: FakeDdi) -> None:
    fake.deploy(Action("14", make_bundle("2.0").read_bytes()))
    assert service(device_dir, fake.url).rebooted
    dead = "http://127.0.0.1:9"  # the controller is unreachable while the trial runs
    out = service(device_dir, dead)
    assert out.error is not None and fake.actions[0].closed is None
    assert running(device_dir) == ("B", "2.0", "idle")  # committed offline
    drive(device_dir, fake.url, fake, "14")
    ex = fake.executions("14")
    assert ex[-1] == "closed/success" and ex.count("closed/success") == 1
    assert fake.duplicates == 0


def test_hash_mismatch_fails_before_the_trial_is_armed(
        device_dir: Path, make_bundle: BundleFactory, fake: FakeDdi) -> None:
    fake.deploy(Action("15", make_bundle("2.0").read_bytes(), sha256="ab" * 32))
    out = service(device_dir, fake.url)
    assert not out.rebooted and fake.actions[0].closed == "failure"
    assert running(device_dir) == ("A", "1.0", "idle")


def test_maintenance_window_waits_then_cancel_is_confirmed(
        device_dir: Path, make_bundle: BundleFactory, fake: FakeDdi) -> None:
    fake.deploy(Action("16", make_bundle("2.0").read_bytes(), window="unavailable"))
    service(device_dir, fake.url)
    service(device_dir, fake.url)
    assert fake.executions("16") == ["scheduled/none"]  # once, not on every poll
    assert not [p for m, p, h in fake.requests if p.startswith("/artifacts/")]
    fake.cancel("16")
    service(device_dir, fake.url)
    assert fake.actions[0].canceled and fake.cancel_pending is None
    assert running(device_dir) == ("A", "1.0", "idle")


def test_power_cut_mid_download_restarts_the_action(
        device_dir: Path, make_bundle: BundleFactory, fake: FakeDdi) -> None:
    proxy = FaultProxy(fake.address, [Fault("drop", after=60_000)] * 3,
                       match=b"/artifacts/")
    fake.public_url = proxy.url
    try:
        fake.deploy(Action("17", make_bundle("2.0").read_bytes()))
        tight = DownloadPolicy(read_timeout=1, backoff=0.01, max_resumes=1)
        out = service(device_dir, proxy.url, download=tight)
        assert not out.rebooted and fake.actions[0].closed is None
        SimFirmware(device_dir).power_cut()
        drive(device_dir, proxy.url, fake, "17")
        assert fake.actions[0].closed == "success"
        assert running(device_dir) == ("B", "2.0", "idle")
    finally:
        proxy.close()


def test_config_data_is_sent_when_asked(device_dir: Path, fake: FakeDdi) -> None:
    fake.want_config = True
    service(device_dir, fake.url, attributes={"site": "lab"})
    assert fake.config_data is not None and fake.config_data["mode"] == "merge"
    assert fake.config_data["data"]["edgeops.version"] == "1.0"
    assert fake.config_data["data"]["site"] == "lab"


def test_model_reports_reach_the_controller_as_attributes(device_dir: Path, fake: FakeDdi) -> None:
    j = Journal(device_dir / "state" / "journal.db")
    j.enqueue(MODEL_KIND, {"model": "detector", "version": "4", "status": "activated", "reason": "ok"})
    j.enqueue(MODEL_KIND, {"model": "detector", "version": "4", "status": "reverted",
                           "reason": "p95 latency 3.1x the previous model"})
    j.close()
    service(device_dir, fake.url)
    assert fake.config_data is not None
    assert fake.config_data["data"]["edgeops.model.detector"] == "4 reverted"
    assert fake.config_data["data"]["edgeops.compatible"] == "edgeops-sim"  # never alone
    assert "p95" in fake.config_data["data"]["edgeops.model.detector.reason"]
    j = Journal(device_dir / "state" / "journal.db")
    assert j.pending(kind=MODEL_KIND) == [] and j.pending() == []
    j.close()


def test_longpoll_wakes_at_once_and_falls_back_to_polling(fake: FakeDdi) -> None:
    client = DdiClient(fleet_cfg(fake.url))
    etag = client.poll().etag
    threading.Timer(0.3, fake.changed).start()
    t0 = time.monotonic()
    assert LongPoll(client, wait=5).wait(8, etag) is True
    assert time.monotonic() - t0 < 3
    fake.longpoll = False  # stock hawkBit: answers at once, unchanged
    lp = LongPoll(client, wait=5)
    t0 = time.monotonic()
    assert lp.wait(1.5, client.poll().etag) is False
    assert lp.supported is False and 1.4 < time.monotonic() - t0 < 3


def test_fleet_config_from_fleet_toml(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text("[device]\n")
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "fleet.toml").write_text(
        '[fleet]\nurl = "http://127.0.0.1:8080"\ncontroller_id = "d"\nauth = "target"\n'
        'token_file = "token"\nbandwidth = 100000\nmin_rate = 100\n[fleet.attributes]\nsite = "x"\n')
    cfg = load_fleet(tmp_path / "agent.toml")
    assert cfg.token == TOKEN and cfg.download.bandwidth == 100000
    assert cfg.base_url == "http://127.0.0.1:8080/DEFAULT/controller/v1/d"
    assert TOKEN not in repr(cfg)


def test_fleet_section_is_parsed_with_the_config_and_its_token_read_once(device_dir: Path) -> None:
    from agent.core.fleet_config import parse_fleet
    from agent.device.fleet_files import fleet_settings
    from agent.errors import ConfigError

    toml = device_dir / "agent.toml"
    (device_dir / "token").write_text(f"  {TOKEN}\n")
    toml.write_text(toml.read_text() + '\n[fleet]\nurl = "http://127.0.0.1:9"\ncontroller_id = "d"\n'
                    'auth = "target"\ntoken_file = "token"\n')
    cfg = load(toml)
    assert cfg.fleet is not None and cfg.fleet.token == ""  # the core reads no files
    assert cfg.fleet.token_file == device_dir / "token"
    with pytest.raises(ConfigError, match="token_file"):
        DdiClient(cfg.fleet)  # a token nobody read is refused, not sent empty
    toml.write_text(toml.read_text().replace('controller_id = "d"', 'controller_id = "other"'))
    fleet = fleet_settings(cfg)  # from the config as loaded: agent.toml is not read again
    assert fleet is not None and fleet.controller_id == "d" and fleet.token == TOKEN
    assert DdiClient(fleet).origin.headers["Authorization"] == f"TargetToken {TOKEN}"
    (device_dir / "token").write_text("\n")
    with pytest.raises(ConfigError, match="needs token or token_file"):
        fleet_settings(cfg)
    table = {"url": "http://c", "controller_id": "d", "auth": "gateway"}
    with pytest.raises(ConfigError, match="needs token or token_file"):
        parse_fleet(table, device_dir)
    assert parse_fleet({**table, "token": "t"}, device_dir).token == "t"
    assert parse_fleet({**table, "token": "t", "token_file": "f"}, device_dir).token == ""  # file wins


def test_closed_action_is_not_installed_again_while_its_report_is_queued(
        device_dir: Path, make_bundle: BundleFactory, fake: FakeDdi) -> None:
    fake.deploy(Action("18", make_bundle("2.0").read_bytes()))
    assert service(device_dir, fake.url).rebooted
    fake.fail_feedback = 3  # polls work, feedback POSTs fail: the server still lists action 18
    service(device_dir, fake.url)
    assert fake.actions[0].closed is None and running(device_dir) == ("B", "2.0", "idle")
    downloads = len([p for m, p, h in fake.requests if p.startswith("/artifacts/")])
    drive(device_dir, fake.url, fake, "18")
    assert fake.actions[0].closed == "success"
    assert len([p for m, p, h in fake.requests if p.startswith("/artifacts/")]) == downloads == 1
    assert running(device_dir) == ("B", "2.0", "idle")


def test_cli_fleet_poll_once_and_status(device_dir: Path, make_bundle: BundleFactory,
                                        fake: FakeDdi) -> None:
    from tests.conftest import run_cli

    (device_dir / "token").write_text(TOKEN)
    (device_dir / "fleet.toml").write_text(
        f'[fleet]\nurl = "{fake.url}"\ncontroller_id = "dev1"\nauth = "target"\n'
        f'token_file = "token"\nmin_sleep = 0\n')
    cfg = device_dir / "agent.toml"
    fake.deploy(Action("19", make_bundle("2.0").read_bytes()))
    first = run_cli("fleet", "poll", "--once", "--config", cfg, check=True)
    assert "rebooting into the trial" in first.stdout and TOKEN not in first.stdout + first.stderr
    second = run_cli("fleet", "poll", "--once", "--config", cfg, check=True)
    assert "closed/success" in second.stdout, second.stdout
    st = run_cli("fleet", "status", "--json", "--config", cfg, check=True)
    import json

    doc = json.loads(st.stdout)
    assert doc["action"] is None and doc["pending_reports"] == 0 and TOKEN not in st.stdout
    assert fake.actions[0].closed == "success" and running(device_dir) == ("B", "2.0", "idle")


def _tls_material(d: Path) -> dict[str, Path]:
    """A throwaway CA, a server cert for 127.0.0.1 and a device (client) cert."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(cn: str, key: Any, issuer: str, signer: Any, *, ca: bool = False,
             ip: bool = False) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ip:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return b.sign(signer, hashes.SHA256())

    out: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("test ca", ca_key, "test ca", ca_key, ca=True)
    for role, ip in (("server", True), ("device", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        crt = cert(role, key, "test ca", ca_key, ip=ip)
        out[f"{role}_crt"] = d / f"{role}.crt"
        out[f"{role}_crt"].write_bytes(crt.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = d / f"{role}.key"
        out[f"{role}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    out["ca"] = d / "ca.crt"
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return out


def test_mtls_controller_with_private_ca(tmp_path: Path) -> None:
    import ssl

    tls = _tls_material(tmp_path)
    fake = FakeDdi()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls["server_crt"], tls["server_key"])
    ctx.load_verify_locations(tls["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED  # no device certificate, no TLS session
    fake.server.socket = ctx.wrap_socket(fake.server.socket, server_side=True)
    url = f"https://127.0.0.1:{fake.address[1]}"
    try:
        cfg = FleetConfig(url=url, controller_id="dev1", client_cert=tls["device_crt"],
                          client_key=tls["device_key"], ca_cert=tls["ca"])
        assert DdiClient(cfg).poll().base is not None
        anonymous = FleetConfig(url=url, controller_id="dev1", ca_cert=tls["ca"])
        with pytest.raises(TransportError, match="failed"):
            DdiClient(anonymous).poll()
        untrusted = FleetConfig(url=url, controller_id="dev1", client_cert=tls["device_crt"],
                                client_key=tls["device_key"])  # system CAs only
        with pytest.raises(TransportError, match="failed"):
            DdiClient(untrusted).poll()
    finally:
        fake.close()
