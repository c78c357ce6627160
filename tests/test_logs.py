"""Loggers that load logging at their first use, configured as the CLI asked (agent.core.logs)."""

from __future__ import annotations

import copy
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core import logs

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter, where nothing has loaded logging yet."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          check=True)


def test_getting_a_logger_does_not_load_logging() -> None:
    out = _run("import sys\nfrom agent.core import logs\nlog = logs.get('edgeops.x')\n"
               "print('logging' in sys.modules)\nlog.debug('nothing')\nprint('logging' in sys.modules)")
    assert out.stdout.split() == ["False", "True"]


def test_a_lazy_configuration_formats_the_first_record() -> None:
    out = _run("import sys\nfrom agent.core import logs\n"
               "logs.configure(eager=False, level=logs.WARNING,\n"
               "               format='edgeops: %(levelname)s: %(message)s')\n"
               "print('logging' in sys.modules)\n"
               "log = logs.get('edgeops.x')\nlog.info('not shown')\nlog.warning('slot %s is full', 'B')")
    assert out.stdout.split() == ["False"]
    assert out.stderr == "edgeops: WARNING: slot B is full\n"


# (what loads logging, and when, around the configuration) -> what the record looks like
CONFIGURED_BEFORE_THE_FIRST_RECORD = {
    "lazy, logging loaded already by a library": (
        "import logging\nfrom agent.core import logs\n"
        "logs.configure(eager=False, level=logs.INFO, format='x %(name)s %(message)s')\n"
        "logging.getLogger('lib').info('from a library')", "x lib from a library\n"),
    "eager, a library's record comes first": (
        "from agent.core import logs\n"
        "logs.configure(level=logs.DEBUG, format='%(levelname)s %(message)s')\n"
        "import logging\nlogging.getLogger('lib').debug('a library, first')", "DEBUG a library, first\n"),
    "lazy, load() for code that logs directly": (
        "from agent.core import logs\n"
        "logs.configure(eager=False, format='y %(message)s')\n"
        "logs.load().getLogger('urllib3').warning('retrying')", "y retrying\n"),
}


@pytest.mark.parametrize(("code", "stderr"), CONFIGURED_BEFORE_THE_FIRST_RECORD.values(),
                         ids=CONFIGURED_BEFORE_THE_FIRST_RECORD.keys())
def test_the_configuration_is_in_place_for_the_first_record(code: str, stderr: str) -> None:
    assert _run(code).stderr == stderr


@pytest.mark.parametrize(("ours", "theirs"), [(logs.DEBUG, logging.DEBUG), (logs.INFO, logging.INFO),
                                              (logs.WARNING, logging.WARNING), (logs.ERROR, logging.ERROR)])
def test_the_level_numbers_are_logging_s(ours: int, theirs: int) -> None:
    assert ours == theirs


def test_a_lazy_logger_is_the_named_logger(caplog: pytest.LogCaptureFixture) -> None:
    log = logs.get("edgeops.test-logs")
    with caplog.at_level(logging.INFO, logger="edgeops.test-logs"):
        log.info("probe %d passed", 3)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("edgeops.test-logs", "probe 3 passed")]
    assert log.getEffectiveLevel() == logging.getLogger("edgeops.test-logs").getEffectiveLevel()


def test_a_lazy_logger_takes_attributes_copies_and_pickles_as_a_logger_does() -> None:
    log = logs.get("edgeops.test-logs-attrs")
    log.propagate = False
    assert logging.getLogger("edgeops.test-logs-attrs").propagate is False
    log.propagate = True
    for other in (copy.copy(log), pickle.loads(pickle.dumps(log))):
        assert other.name == "edgeops.test-logs-attrs"
        assert other.getEffectiveLevel() == logging.getLogger("edgeops.test-logs-attrs").getEffectiveLevel()
