"""Loggers that load logging at their first use, configured as the CLI asked (agent.core.logs)."""

from __future__ import annotations

import logging
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


def test_a_lazy_configuration_applies_at_once_when_logging_is_loaded_already() -> None:
    out = _run("import logging\nfrom agent.core import logs\n"
               "logs.configure(eager=False, level=logs.INFO, format='x %(name)s %(message)s')\n"
               "logging.getLogger('lib').info('from a library')")
    assert out.stderr == "x lib from a library\n"


def test_an_eager_configuration_applies_before_any_record() -> None:
    out = _run("import sys\nfrom agent.core import logs\n"
               "logs.configure(level=logs.DEBUG, format='%(levelname)s %(message)s')\n"
               "import logging\nlogging.getLogger('lib').debug('a library, first')")
    assert out.stderr == "DEBUG a library, first\n"


def test_load_applies_a_pending_configuration_for_code_that_logs_directly() -> None:
    out = _run("from agent.core import logs\n"
               "logs.configure(eager=False, format='y %(message)s')\n"
               "logs.load().getLogger('urllib3').warning('retrying')")
    assert out.stderr == "y retrying\n"


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
