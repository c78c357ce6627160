"""The console's audit trail leaves the device: queued in the outbox while offline, delivered to
the controller (a DDI server on 127.0.0.1) as attributes once the fleet agent reaches it."""

from __future__ import annotations

import io
from pathlib import Path

from agent.adapters.journal import Journal
from agent.core import console_audit
from agent.core.config import load
from agent.device import console
from tests.fakeddi import FakeDdi
from tests.test_client import fake, service

__all__ = ["fake"]  # the fixture, used by name


def test_console_logins_reach_the_controller_when_the_link_returns(device_dir: Path,
                                                                  fake: FakeDdi) -> None:
    cfg = load(device_dir / "agent.toml")
    console.set_pin(cfg, "246813")
    term = console.Terminal(io.StringIO("login\n999999\nlogin\n246813\nexit\n"), io.StringIO())
    console.Session(cfg, term).run()
    j = Journal(cfg.journal_path)
    queued = [body["event"] for _, _, body in j.pending(kind=console_audit.KIND)]
    j.close()
    assert queued == ["login-failed", "login", "logout"]  # offline: kept, in order
    service(device_dir, fake.url)
    assert fake.config_data is not None
    sent = {k: v for k, v in fake.config_data["data"].items() if k.startswith("edgeops.console.audit.")}
    assert [v.split()[1] for _, v in sorted(sent.items(), key=lambda kv: int(kv[0].rsplit(".", 1)[1]))] \
        == ["login-failed", "login", "logout"]
    assert fake.config_data["data"]["edgeops.compatible"] == "edgeops-sim"  # never alone
    j = Journal(cfg.journal_path)
    assert j.pending(kind=console_audit.KIND) == []
    j.close()


def test_refused_commands_typed_at_the_port_cannot_flood_the_journal(device_dir: Path) -> None:
    cfg = load(device_dir / "agent.toml")
    term = console.Terminal(io.StringIO("reboot\n" * 50 + "exit\n"), io.StringIO())
    console.Session(cfg, term).run()
    j = Journal(cfg.journal_path)
    rows = [r for r in j.history(1000) if r.event == "console-command"]
    j.close()
    assert len(rows) == console.MAX_REFUSALS_AUDITED
    assert rows[-1].detail.count("further refusals this session not recorded") == 1
