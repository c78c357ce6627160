"""Named loggers that load the standard ``logging`` only when first used.

``logging`` and what it imports (traceback, linecache, tokenize, textwrap, weakref) cost a
64 MiB install ~10 ms of its ~140 (docs/performance.md, section 8), and an install that
goes well logs nothing. So every module of the agent takes its logger from here,
``log = logs.get("edgeops.x")``, and uses it as a ``logging.Logger``: the first call on it
loads ``logging``. The CLI's ``configure`` (``logging.basicConfig``) is applied at once
when ``logging`` is loaded already, else when one of these loggers first loads it.
tests/test_layout.py keeps every other module from importing ``logging`` at its top.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import logging
    from types import ModuleType

# logging's own level numbers (stable since Python 2.3), so callers need not load it for them
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

_pending: dict[str, Any] | None = None  # basicConfig's arguments, until logging is loaded
_loading = threading.Lock()  # a second thread's first record waits for the configuration


def configure(*, eager: bool = True, **basic_config: Any) -> None:
    """``logging.basicConfig(**basic_config)``: now if ``eager`` or if ``logging`` is loaded
    already, else when a logger of this module first loads it. A library that loads
    ``logging`` on its own and logs before any edgeops logger does finds it unconfigured:
    commands that run such libraries configure eagerly."""
    global _pending
    _pending = basic_config
    if eager or "logging" in sys.modules:
        load()


def load() -> ModuleType:
    """``logging``, configured as ``configure`` asked (for code that logs through it directly)."""
    global _pending
    import logging

    if _pending is not None:
        with _loading:
            if _pending is not None:
                logging.basicConfig(**_pending)
                _pending = None
    return logging


class _Lazy:
    """A ``logging.Logger`` stand-in that fetches the real one at its first use."""

    __slots__ = ("_real", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._real: logging.Logger | None = None

    def _logger(self) -> logging.Logger:
        if self._real is None:
            self._real = load().getLogger(self.name)
        return self._real

    def __getattr__(self, attr: str) -> Any:  # debug, warning, exception, setLevel, ...
        if attr in _Lazy.__slots__:  # a slot not set yet (copy, unpickle): not the logger's
            raise AttributeError(attr)
        return getattr(self._logger(), attr)

    def __setattr__(self, attr: str, value: Any) -> None:  # log.disabled = True, ...
        if attr in _Lazy.__slots__:
            object.__setattr__(self, attr, value)
        else:
            setattr(self._logger(), attr, value)

    def __reduce__(self) -> tuple[Any, tuple[str]]:  # as a Logger pickles: by its name
        return get, (self.name,)


def get(name: str) -> logging.Logger:
    """The logger ``name``, as ``logging.getLogger(name)`` would return at its first use."""
    return cast("logging.Logger", _Lazy(name))
