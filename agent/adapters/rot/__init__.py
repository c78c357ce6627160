"""The root of trust: one interface, two backends (``tpm``, ``keystore``), and the chooser.

``open_root`` picks the TPM when ``[tpm] tcti`` names one that answers, and the
software keystore otherwise, unless the board says ``required``; the updater asks
``root_for_updater``, which is None on a board that never opted in. The backends
are imported by the chooser when it needs them (tpm2-pytss only when a TPM is
configured), as ``agent.adapters.bootloader`` loads its backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.core.config import TpmSettings, tpm_settings_from_toml
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.adapters.rot.base import (
        KeyringMismatch,
        NotProvisioned,
        Quote,
        RootOfTrust,
        RootStatus,
        TpmError,
        TpmRequired,
        TpmUnavailable,
    )

# The interface's names, imported from rot.base on first use (PEP 562): a board that never
# opted in answers root_for_updater without it, and 'edgeops status' loads no records it
# would not use (tools/bench/startup.py).
_FROM_BASE = {"KeyringMismatch", "NotProvisioned", "Quote", "RootOfTrust", "RootStatus", "TpmError",
              "TpmRequired", "TpmUnavailable"}


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from agent.adapters.rot import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def keystore_provisioned(state_dir: Path) -> bool:
    """Whether a software keystore was provisioned under ``state_dir`` (a board without a TPM
    opts in so). Here, not in the keystore module, so asking costs no cryptography import."""
    return (state_dir / "keystore" / "state.json").exists()


def open_root(settings: TpmSettings, state_dir: Path) -> RootOfTrust:
    """The TPM if configured and reachable; otherwise the keystore, unless a TPM is required."""
    from agent.adapters.rot.base import TpmRequired, TpmUnavailable

    if settings.tcti is not None:
        from agent.adapters.rot.tpm import TpmRoot

        root = TpmRoot(settings, state_dir)
        try:
            root.ping()
            return root
        except TpmUnavailable as exc:
            if settings.required:
                raise TpmRequired(f"a TPM is required but unavailable: {exc}") from None
            failure = str(exc)
    elif settings.required:
        raise TpmRequired("a TPM is required but tpm_tcti is not set")
    else:
        failure = "no tpm_tcti configured"
    from agent.adapters.rot.keystore import KeystoreRoot

    return KeystoreRoot(state_dir, pcr=settings.pcr, reason=failure)


def root_for_updater(settings: TpmSettings, state_dir: Path) -> RootOfTrust | None:
    """The root the updater should consult, or None when the feature is off.

    Off means: no TPM configured, not required, and no provisioned keystore — so
    boards that never opted in behave exactly as before. A configured TPM that is
    not provisioned is *not* off: its checks raise ``NotProvisioned`` (fail closed).
    """
    if settings.tcti is None and not settings.required and not keystore_provisioned(state_dir):
        return None
    return open_root(settings, state_dir)


def load_settings(config_path: Path) -> TpmSettings:
    """The [tpm] settings of the file at ``config_path``.

    For callers that hold only a path (``FleetIdentity.for_agent``); everyone holding
    the parsed config uses ``AgentConfig.tpm`` and reads nothing.
    """
    try:
        text = config_path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {config_path}: {exc.strerror}") from None
    return tpm_settings_from_toml(text, config_path)


__all__ = ["KeyringMismatch", "NotProvisioned", "Quote", "RootOfTrust", "RootStatus", "TpmError",
           "TpmRequired", "TpmUnavailable", "keystore_provisioned", "load_settings", "open_root",
           "root_for_updater"]
