"""One error hierarchy for the whole agent.

Callers branch on the root: a ``TrustError`` means "these bytes are bad, never
retry them", a ``TransportError`` means "try again later", a ``DeviceError``
means the device itself misbehaved. Exit codes are assigned in ``agent.cli``
only. Every error carries a ``hint``: the one thing a person should do next.
"""

from __future__ import annotations


class EdgeopsError(Exception):
    """Base of every error the agent raises on purpose."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def one_line(self) -> str:
        text = str(self)
        return f"{text}; {self.hint}" if self.hint else text


class ConfigError(EdgeopsError):
    hint = "fix the configuration file named above"


class UsageError(EdgeopsError):
    hint = "see 'edgeops --help'"


# --- bad bytes: never retried -------------------------------------------------
class TrustError(EdgeopsError):
    """The input is not trustworthy. Retrying the same bytes cannot help."""

    hint = "obtain a bundle signed by a trusted, current signer"


class SignatureError(TrustError):
    pass


class UntrustedSigner(TrustError):
    pass


class SignerExpired(TrustError):
    hint = "re-sign the bundle with a current signer (edgeops keys issue-signer)"


class SignerRevoked(TrustError):
    hint = "re-sign the bundle with a signer that has not been revoked"


class RollbackRefused(TrustError):
    hint = "build the bundle with a security_version at or above the device's floor"


class IncompatibleBundle(TrustError):
    hint = "build the bundle for this board's compatible string"


class BundleError(TrustError):
    """The container or a payload is malformed, truncated or does not match the manifest."""

    hint = "the bundle is damaged or forged; download or build it again"


class ManifestError(BundleError):
    pass


class UnsafeMember(BundleError):
    hint = "bundles hold only regular files with fixed names; rebuild with 'edgeops bundle create'"


class TruncatedBundle(BundleError):
    hint = "the file is incomplete: copy or download it again"


class HashMismatch(BundleError):
    pass


class PayloadTooLarge(BundleError):
    hint = "use a bundle whose payload fits the slot, or a board with larger slots"


# --- retryable ---------------------------------------------------------------
class TransportError(EdgeopsError):
    hint = "check the network or the source, then retry"


# --- the device --------------------------------------------------------------
class DeviceError(EdgeopsError):
    hint = "check the storage and bootloader configuration ('edgeops status')"


class SlotError(DeviceError):
    pass


class BootloaderError(DeviceError):
    pass


class StateError(EdgeopsError):
    """The request does not fit the device's current state."""

    hint = "see 'edgeops status'"


class DeviceBusy(StateError):
    """Another edgeops process holds the device lock."""

    hint = "wait for the running install or agent cycle to finish"


class HealthCheckFailed(EdgeopsError):
    hint = "see 'edgeops history' for the failing probe"
