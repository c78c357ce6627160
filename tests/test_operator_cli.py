"""The controller CLI for people (issue 13, items 3 and 4): tables, ISO times, actions, --watch,
one log line per transition, and a --help that explains every option and ends with an example.

The commands run as subprocesses against a real controller on 127.0.0.1 over real SQLite.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from agent.cli.main import COMMANDS, OWN_COMMANDS, build_parser
from agent.host.simfleet import LocalController, start_controller
from tests.conftest import COMPATIBLE, EDGEOPS, Keys, run_cli

ISO = re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\b")


@pytest.fixture
def ctl(tmp_path: Path, pki: Keys) -> Iterator[LocalController]:
    c = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600)
    yield c
    c.stop()


def _cli(ctl: LocalController, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("controller", *args, "--url", ctl.url, "--token", ctl.token)


def _device(ctl: LocalController, did: str) -> str:
    token = str(ctl.api("POST", "/devices", {"id": did, "site": "lyon"})["token"])
    r = requests.put(f"{ctl.url}/DEFAULT/controller/v1/{did}/configData", timeout=10,
                     headers={"Authorization": f"TargetToken {token}"},
                     json={"mode": "merge", "data": {"edgeops.compatible": COMPATIBLE,
                                                     "edgeops.version": "1.0"}})
    assert r.status_code == 200
    ctl.fleet.touch({did: time.time()})
    return token


def _report(ctl: LocalController, did: str, token: str, aid: int, finished: str, why: str) -> None:
    r = requests.post(f"{ctl.url}/DEFAULT/controller/v1/{did}/deploymentBase/{aid}/feedback", timeout=10,
                      headers={"Authorization": f"TargetToken {token}"},
                      json={"status": {"execution": "closed", "result": {"finished": finished},
                                       "details": [why]}})
    assert r.status_code == 200, r.text


def _deployed(ctl: LocalController, make_bundle, did: str = "d1") -> tuple[int, int, str]:
    token = _device(ctl, did)
    with open(make_bundle("2.0", size=4096), "rb") as f:
        bid = ctl.api("POST", "/bundles?filename=b.bundle", data=f)["id"]
    rid = ctl.api("POST", "/deployments", {"bundle": bid, "device": did})["id"]
    aid = ctl.api("GET", f"/actions?rollout={rid}")["actions"][0]["id"]
    return rid, aid, token


def test_device_list_is_a_table_with_iso_times(ctl: LocalController) -> None:
    _device(ctl, "store-17")
    out = _cli(ctl, "device", "list").stdout
    header, row = out.splitlines()[:2]
    assert header.split()[:3] == ["DEVICE", "SITE", "VERSION"]
    assert row.split()[:3] == ["store-17", "lyon", "1.0"]
    assert ISO.search(row), row


def test_json_gives_the_controllers_answer(ctl: LocalController) -> None:
    _device(ctl, "store-17")
    doc = json.loads(_cli(ctl, "device", "list", "--json").stdout)
    assert [d["id"] for d in doc["devices"]] == ["store-17"]


def test_actions_show_state_and_the_devices_failure_reason(ctl: LocalController, make_bundle) -> None:
    rid, aid, token = _deployed(ctl, make_bundle)
    _report(ctl, "d1", token, aid, "failure", "probe 'web' failed 3 times in a row")
    out = _cli(ctl, "actions", "--rollout", str(rid)).stdout
    header, row = out.splitlines()[:2]
    assert "STATE" in header and "REASON" in header
    assert "failure" in row and "probe 'web' failed 3 times in a row" in row
    assert ISO.search(row)
    assert _cli(ctl, "actions", "--device", "nobody").stdout.splitlines()[1:] == []


def test_rollout_status_shows_waves_and_history(ctl: LocalController, make_bundle) -> None:
    rid, aid, token = _deployed(ctl, make_bundle)
    _report(ctl, "d1", token, aid, "failure", "boom")
    out = _cli(ctl, "rollout", "status", str(rid)).stdout
    assert "status     paused" in out
    assert re.search(r"^0\*?\s+1\s+0\s+0\s+0\s+0\s+1\s+0$", out, re.M), out  # one device, failed
    assert re.search(r"^\S+Z\s+controller\s+paused\b", out, re.M), out
    listing = _cli(ctl, "rollout", "status").stdout
    assert listing.splitlines()[0].split()[:4] == ["ID", "NAME", "BUNDLE", "STATUS"]


def test_rollout_status_watch_follows_until_the_rollout_ends(ctl: LocalController, make_bundle) -> None:
    rid, aid, token = _deployed(ctl, make_bundle)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    watch = subprocess.Popen([*EDGEOPS, "controller", "rollout", "status", str(rid), "--watch",
                              "--interval", "0.2", "--url", ctl.url, "--token", ctl.token],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        time.sleep(2.0)
        assert watch.poll() is None  # still running: still watching
        _report(ctl, "d1", token, aid, "success", "committed")
        out, err = watch.communicate(timeout=30)
    finally:
        watch.kill()
    assert watch.returncode == 0, err
    blocks = out.split("--- ")[1:]
    assert len(blocks) == 2, out  # printed when it changed, not every 0.2 s
    assert "status     running" in blocks[0] and "status     finished" in blocks[1]


def test_each_transition_and_failed_action_is_one_log_line(ctl: LocalController, make_bundle,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeops.controller.rollouts")
    rid, aid, token = _deployed(ctl, make_bundle)
    _report(ctl, "d1", token, aid, "failure", "probe 'web' failed")
    lines = [r.getMessage() for r in caplog.records if r.name == "edgeops.controller.rollouts"]
    assert any(f"rollout {rid} created" in m for m in lines), lines
    assert any(f"action {aid} of device d1 failed: probe 'web' failed" in m for m in lines), lines
    assert any(f"rollout {rid} paused by controller" in m for m in lines), lines
    assert all("\n" not in m for m in lines)


def _subparsers(p: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in p._actions:  # argparse keeps its subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                yield name, sp
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sp))


# Every command word 'edgeops --help' lists: a new group is covered as soon as main.py names it.
WORDS = (*COMMANDS, *OWN_COMMANDS)
HIDDEN = {("agent", "report_fd")}  # the service worker's descriptor: not for people (device_cmd)


def _commands(word: str) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser of 'edgeops WORD ...', and WORD's command parsers by name ('bundle create')."""
    top = build_parser([word, "--help"])
    return top, {name: sp for name, sp in _subparsers(top) if name.split()[0] == word}


def _example(text: str) -> list[str]:
    """The command lines after the last 'example:' in a --help, continuations joined."""
    block = text.rpartition("\nexample:\n")[2].replace("\\\n", " ")
    return [line.strip() for line in block.splitlines() if line.strip()]


def _words(line: str) -> list[str]:
    """``line`` as the shell splits it, up to a comment, redirection or pipe."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(itertools.takewhile(lambda w: not set(w) <= set("();<>|&"), lex))


@pytest.mark.parametrize("word", WORDS)
def test_every_help_explains_each_option_and_ends_with_an_example(word: str) -> None:
    commands = _commands(word)[1]
    assert commands, f"edgeops {word}: not registered"
    for name, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or (name, action.dest) in HIDDEN:
                continue
            option = "/".join(action.option_strings) or action.metavar or action.dest
            assert action.help and action.help != argparse.SUPPRESS, \
                f"edgeops {name}: {option} has no help sentence"
        assert parser.description, f"edgeops {name}: no description"
        text = parser.format_help()
        assert "\nexample:\n" in text and _example(text)[-1].startswith("edgeops "), \
            f"edgeops {name}: its --help does not end with 'example:' and an edgeops command line"


@pytest.mark.parametrize("word", WORDS)
def test_every_example_is_a_command_line_of_its_own_command(word: str) -> None:
    top, commands = _commands(word)
    for name, parser in commands.items():
        lines = [line for line in _example(parser.format_help()) if line.startswith("edgeops ")]
        assert lines, f"edgeops {name}: no example"
        for line in lines:
            argv = _words(line)[1:]
            assert argv[:len(name.split())] == name.split(), \
                f"edgeops {name}: its example is of another command: {line}"
            try:
                args = top.parse_args(argv)
            except SystemExit:
                pytest.fail(f"edgeops {name}: its example does not parse: {line}")
            if parser.get_default("func") is not None:
                assert args.func is parser.get_default("func"), \
                    f"edgeops {name}: its example runs another command: {line}"


def test_controller_help_names_its_environment() -> None:
    text = run_cli("controller", "--help", check=True).stdout
    assert "EDGEOPS_CONTROLLER_URL" in text and "EDGEOPS_CONTROLLER_TOKEN" in text
