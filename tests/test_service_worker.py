"""The idle service: a standard-library parent decides each wake-up, a worker process does the work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.ddi_poll import Redirected
from agent.core import ddi, lifecycle
from agent.core.config import AgentConfig, load
from agent.core.fleet_config import FleetConfig
from agent.core.lifecycle import Phase, State
from agent.device import service
from agent.device.worker import Done, IdleAgent, Wake, Worker, WorkerFailed, journal_mark
from agent.errors import TransportError
from tests.conftest import BundleFactory
from tests.fakeddi import Action, FakeDdi

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "t0k3n"
HEAVY = ("requests", "urllib3", "cryptography", "zstandard", "sqlite3", "http.client", "email",
         "agent.adapters.ddi_http", "agent.adapters.download", "agent.adapters.bundle",
         "agent.adapters.journal", "agent.device.fleet", "agent.device.updater", "argparse")


# --- lifecycle.needs_cycle ----------------------------------------------------------------------
def _in(phase: Phase) -> State:
    """Slot B being installed from A during boot b0; from TESTING on, b1 is the trial boot."""
    boot = "b1" if phase in (Phase.TESTING, Phase.COMMITTING, Phase.REVERTING) else "b0"
    return State(phase, "B", "A", "2.0", 1, boot, 1)


@pytest.mark.parametrize("state, booted, boot_id, due", [
    (State(), "A", "b0", False),  # idle: nothing to do, ever
    (State(), "B", "b9", False),
    (_in(Phase.WRITING), "A", "b0", True),  # the installer died: mark the slot empty again
    (_in(Phase.WRITING), "A", "b1", True),  # power was lost while writing
    (_in(Phase.WRITTEN), "A", "b0", True),  # the trial flag is still to be set
    (_in(Phase.TRIAL_PENDING), "A", "b0", False),  # armed, waiting for its reboot
    (_in(Phase.TRIAL_PENDING), "B", "b1", True),  # the trial boot: start the checks
    (_in(Phase.TRIAL_PENDING), "A", "b1", True),  # the bootloader fell back: record it
    (_in(Phase.TESTING), "B", "b1", True),  # the agent restarted mid-trial: check again
    (_in(Phase.COMMITTING), "B", "b1", True),
    (_in(Phase.REVERTING), "A", "b2", True),
])
def test_needs_cycle(state: State, booted: str, boot_id: str, due: bool) -> None:
    assert lifecycle.needs_cycle(state, booted, boot_id) is due


def test_needs_cycle_is_exactly_whether_booted_changes_anything() -> None:
    for phase in Phase:
        for booted, boot_id in (("A", "b0"), ("B", "b1"), ("A", "b1")):
            s = _in(phase) if phase is not Phase.IDLE else State()
            t = lifecycle.step(s, lifecycle.Booted(booted, boot_id))
            quiet = t.state == s and not t.records and not t.actions and t.then is None
            assert lifecycle.needs_cycle(s, booted, boot_id) is not quiet


# --- the decision: when a wake-up needs a worker ----------------------------------------------------
class Poll:
    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)

    def poll(self, *, etag: str | None = None, wait: float = 0) -> Any:
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a


class Workers:
    def __init__(self, *done: Done) -> None:
        self.done, self.deadlines = list(done), []

    def __call__(self, started: Callable[[float], None]) -> Done:
        started(300.0)
        self.deadlines.append(300.0)
        return self.done.pop(0) if self.done else Done(Wake(False, 30.0, '"w"'))


def _base(**links: str) -> Any:
    from agent.adapters.ddi_poll import BaseAnswer

    return BaseAnswer(ddi.BaseResource(sleep=30.0, deployment=links.get("deployment"),
                                       cancel=links.get("cancel"),
                                       config_data=links.get("config_data")), '"p"')


@pytest.fixture
def cfg(device_dir: Path) -> AgentConfig:
    return load(device_dir / "agent.toml")


def test_idle_wake_ups_start_a_worker_only_for_work(cfg: AgentConfig) -> None:
    href = "http://ctl/DEFAULT/controller/v1/dev1/deploymentBase/7"
    poll = Poll(_base(), _base(deployment=href), TransportError("down"), _base(), _base(),
                Redirected("moved"), _base(config_data=href))
    workers = Workers(Done(Wake(False, 30.0, '"w"')), Done(Wake(False, 30.0), reports=True))
    fleet = FleetConfig(url="http://ctl", controller_id="dev1")
    idle = IdleAgent(cfg, fleet, poll, workers)  # type: ignore[arg-type]
    reasons = []
    for _ in range(8):
        idle()
        reasons.append(idle.last_reason)
    assert reasons == ["start", None, "controller", None, "reports", None, "redirect", "controller"]
    assert idle.etag == '"w"'


def test_a_cycle_left_due_or_a_changed_journal_starts_a_worker(cfg: AgentConfig) -> None:
    workers = Workers(Done(Wake(False, 5.0), cycle=True))
    idle = IdleAgent(cfg, None, None, workers)
    assert idle().interval == 5.0 and idle.last_reason == "start"
    assert idle.last_reason == "start" and (idle(), idle.last_reason)[1] == "cycle"
    assert (idle(), idle.last_reason)[1] is None
    from agent.adapters.journal import Journal

    j = Journal(cfg.journal_path)  # a technician's command, say
    j.put("something", 1)
    j.close()
    assert (idle(), idle.last_reason)[1] == "journal"
    assert (idle(), idle.last_reason)[1] is None and len(workers.deadlines) == 3


def test_journal_mark_changes_with_every_commit(cfg: AgentConfig) -> None:
    from agent.adapters.journal import Journal

    j = Journal(cfg.journal_path)
    try:
        before = journal_mark(cfg.journal_path)
        assert journal_mark(cfg.journal_path) == before  # reading changes nothing
        j.state()
        assert journal_mark(cfg.journal_path) == before
        j.put("k", "v")
        assert journal_mark(cfg.journal_path) != before
    finally:
        j.close()


def test_serve_ends_with_the_failing_workers_code(cfg: AgentConfig) -> None:
    def failing(started: Callable[[float], None]) -> Done:
        raise WorkerFailed(20)

    with pytest.raises(WorkerFailed) as info:
        service.serve(cfg, worker=failing, stop=service.Stop())
    assert info.value.code == 20


def test_serve_extends_the_watchdog_by_the_trial_bundles_deadline(cfg: AgentConfig,
                                                                  tmp_path: Path) -> None:
    from agent.adapters.watchdog import DevWatchdog, Watchdog

    dev = tmp_path / "watchdog"
    dev.touch()
    clock = [1000.0]
    dogs: list[Watchdog] = []
    stop = service.Stop()

    def watchdog(deadline: float) -> Watchdog:
        dogs.append(Watchdog(DevWatchdog(dev), interval=3600, stale_after=deadline + 35,
                             clock=lambda: clock[0]))
        return dogs[-1]

    def worker(started: Callable[[float], None]) -> Done:
        started(cfg.health_policy.deadline + 500)  # the trial's bundle allows 500 s more
        clock[0] += cfg.health_policy.deadline + 400
        healthy = dogs[0].healthy()
        stop.request()
        return Done(Wake(rebooted=not healthy, interval=1.0))

    assert service.serve(cfg, watchdog=watchdog, worker=worker, stop=stop) == "idle"
    assert dev.read_bytes().endswith(b"V")  # stopped cleanly, and was healthy all along


# --- the worker's protocol --------------------------------------------------------------------------
def test_worker_reports_its_deadline_then_its_wake_up(tmp_path: Path) -> None:
    fake_python = tmp_path / "python"  # says what a worker says on the fd it is given last
    fake_python.write_text(f"#!{sys.executable}\n"
                           "import os, sys\n"
                           "fd = int(sys.argv[-1])\n"
                           "os.write(fd, b'{\"deadline\": 77}\\n')\n"
                           "os.write(fd, b'{\"rebooted\": false, \"interval\": 9, \"etag\": \"e\", "
                           "\"cycle\": true}\\n')\n")
    fake_python.chmod(0o755)
    started: list[float] = []
    done = Worker(tmp_path / "agent.toml", python=str(fake_python))(started.append)
    assert started == [77.0]
    assert done == Done(Wake(False, 9.0, "e"), cycle=True, reports=False)
    fake_python.write_text("#!/bin/sh\nexit 20\n")
    with pytest.raises(WorkerFailed) as info:
        Worker(tmp_path / "agent.toml", python=str(fake_python))(started.append)
    assert info.value.code == 20


def test_the_worker_command_reports_over_its_fd(device_dir: Path) -> None:
    r, w = os.pipe()
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "--once", "--config",
                           str(device_dir / "agent.toml"), "--report-fd", str(w)],
                          pass_fds=(w,), cwd=ROOT, capture_output=True, text=True, timeout=60)
    os.close(w)
    with open(r, "rb") as f:
        lines = [json.loads(line) for line in f]
    assert proc.returncode == 0, proc.stderr
    assert "phase:" not in proc.stdout  # the parent says that, once, at its end
    assert lines[0] == {"deadline": 60.0}
    assert lines[1] == {"rebooted": False, "interval": 5.0, "etag": None, "cycle": False,
                        "reports": False}


# --- the service process ----------------------------------------------------------------------------
RUNNER = r"""
import signal, sys
def dump(*a):
    with open(sys.argv[1], "w") as f:
        f.write("\n".join(sorted(sys.modules)))
signal.signal(signal.SIGUSR1, dump)
from agent.cli import serve
sys.exit(serve.main(sys.argv[2:]))
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC"):
        env.pop(k, None)
    return env


def _wait(what: str, cond: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 60
          ) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the agent ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _with_fleet(device_dir: Path, fake: FakeDdi) -> Path:
    cfg = device_dir / "agent.toml"
    with open(cfg, "a") as f:
        f.write(f'\n[fleet]\nurl = "{fake.url}"\ncontroller_id = "dev1"\nauth = "target"\n'
                f'token = "{TOKEN}"\nmin_sleep = 0\n')
    return cfg


def test_the_idle_service_holds_no_http_stack_crypto_codec_or_database(device_dir: Path,
                                                                        tmp_path: Path) -> None:
    fake = FakeDdi(token=TOKEN, sleep="00:01:00")
    cfg = _with_fleet(device_dir, fake)
    dump = tmp_path / "modules"
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(dump), str(cfg)], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        _wait("the long-poll", lambda: any("Prefer" in h for _, _, h in fake.requests), proc)
        proc.send_signal(signal.SIGUSR1)
        _wait("the module dump", lambda: dump.exists() and dump.stat().st_size > 0, proc)
        mods = set(dump.read_text().split())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
        fake.close()
    assert {"agent.device.service", "agent.adapters.ddi_poll", "ssl"} <= mods  # it is the service
    assert not sorted(m for m in mods if m in HEAVY or m.startswith(tuple(h + "." for h in HEAVY)))
    assert proc.returncode == 0 and out.strip().endswith("phase: idle")


def test_edgeops_agent_becomes_the_service_process(device_dir: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--config",
                             str(device_dir / "agent.toml")], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, text=True)
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    try:
        _wait("the exec", lambda: b"agent.cli.serve" in cmdline.read_bytes(), proc)
        registered = device_dir / "run" / "pids" / str(proc.pid)  # the sim board knows it runs
        _wait("the service's start", registered.exists, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0 and out.strip().endswith("phase: idle")


def test_a_deployment_wakes_the_idle_service_and_commits_through_its_workers(
        device_dir: Path, make_bundle: BundleFactory) -> None:
    fake = FakeDdi(token=TOKEN, sleep="00:01:00")  # a poll a minute: only the long-poll is quick
    cfg = _with_fleet(device_dir, fake)

    def agent() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--config", str(cfg)],
                                cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)

    proc = agent()
    try:
        _wait("the long-poll", lambda: any("Prefer" in h for _, _, h in fake.requests), proc)
        fake.deploy(Action("a1", make_bundle("2.0").read_bytes()))
        out, _ = proc.communicate(timeout=120)  # woken, installed, rebooted into the trial
        assert proc.returncode == 0, out
        assert "rebooting into the trial of action a1" in out
        proc = agent()  # systemd starts the agent on the trial boot
        _wait("the final report", lambda: "closed/success" in fake.executions("a1"), proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
        fake.close()
    assert proc.returncode == 0 and out.strip().endswith("phase: idle")
    st = json.loads(subprocess.run([sys.executable, "-m", "agent.cli", "status", "--json",
                                    "--config", str(cfg)], cwd=ROOT, capture_output=True,
                                   text=True, check=True).stdout)
    assert st["booted_slot"] == st["primary_slot"] == "B"
    assert st["slots"]["B"] == {**st["slots"]["B"], "version": "2.0", "state": "good"}
