"""Bootloader backends behind one interface, chosen by name from a registry.

Each backend is one module (as RAUC's src/bootloaders/) and registers itself
with ``register``; the board file names the backend, so adding a board never
means another if/else branch. ``BUILTIN`` names the module of each shipped backend, and
``create`` imports only the one the config names: a device (and ``edgeops status``) never
pays for the parsers and helpers of the three boards it is not. What only some backends can do is a capability
Protocol of its own (``Confirmable``, ``KnowsBootedSlot``), tested with ``isinstance``
so the type checker sees every call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from agent.errors import ConfigError


class Bootloader(Protocol):
    """Which slot boots next. Every method is idempotent and durable when it returns."""

    def primary(self) -> str:
        """The committed slot: booted when no trial is pending, and the fallback of a trial."""

    def trial(self) -> str | None:
        """The slot that will be (or is being) tried once, if any."""

    def set_trial(self, slot: str) -> None:
        """Boot ``slot`` once at the next reboot; any later boot falls back to ``primary()``."""

    def commit(self, slot: str) -> None:
        """Make ``slot`` the primary and end any trial."""

    def mark_bad(self, slot: str) -> None:
        """Never boot ``slot`` again until it is set to trial or committed."""


@runtime_checkable
class Confirmable(Protocol):
    """A scheme that spends a try on every boot (RAUC's: grub, uboot_rauc), so the running
    committed slot must be confirmed on each boot, as RAUC's mark-good service does."""

    def confirm(self, slot: str) -> None:
        """Restore the tries of ``slot`` if it is the committed slot; a fallback slot stays as it is."""


@runtime_checkable
class KnowsBootedSlot(Protocol):
    """A backend that can tell which slot booted from the firmware itself (e.g. rpi_tryboot's
    device tree), before the kernel command line is consulted."""

    def booted_slot(self) -> str | None:
        """The booted slot, or None when the firmware does not say."""


Factory = Callable[[Mapping[str, Any], Path, tuple[str, ...]], Bootloader]
_REGISTRY: dict[str, Factory] = {}
# The shipped backends: name -> the module whose import registers it.
BUILTIN: dict[str, str] = {
    "grub": "agent.adapters.bootloader.grub",
    "rpi_tryboot": "agent.adapters.bootloader.rpi_tryboot",
    "uboot": "agent.adapters.bootloader.uboot",
    "uboot_rauc": "agent.adapters.bootloader.uboot_rauc",
}


def register(name: str) -> Callable[[Factory], Factory]:
    def deco(factory: Factory) -> Factory:
        _REGISTRY[name] = factory
        return factory
    return deco


def create(name: str, settings: Mapping[str, Any], base: Path, slots: tuple[str, ...]) -> Bootloader:
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])  # registers it
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown bootloader backend '{name}'",
                          hint=f"use one of: {', '.join(names())}") from None
    return factory(settings, base, slots)


def names() -> list[str]:
    """Every backend a board file may name: the shipped ones and any registered since."""
    return sorted(set(BUILTIN) | set(_REGISTRY))
