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


class OutputError(ConfigError):
    """A host tool cannot write where it was told to (a missing, read-only or full place)."""

    hint = "choose a writable output path"


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


class SourceNotFound(TransportError):
    """The server answered that it has no such file (HTTP 404 or 410): the URL is wrong, or
    the file was removed. Retrying the same URL cannot help, so it has an exit code of its own."""

    hint = "check the URL: the server has no such file; retrying it will not help"


class Throttled(TransportError):
    """The server said it is busy (HTTP 429, or 503 with ``Retry-After``): the agent waits at
    least ``retry_after`` seconds before it asks again (RFC 9110 section 10.2.3)."""

    hint = "the server is busy; the agent retries after the delay it named"

    def __init__(self, message: str, *, retry_after: float, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


# --- device identity (mTLS): a refused identity is bad credentials, never retried as is ----
class IdentityError(TrustError):
    hint = "enrol the device again or ask the operator to check its record"


class DeviceRevoked(IdentityError):
    hint = "the device was revoked; it must be re-enrolled by an operator"


class CertificateExpired(IdentityError):
    hint = "renew the certificate ('edgeops tpm renew' or wait for the agent to do it)"


class EnrolmentMismatch(IdentityError):
    pass


class CertificateRequired(IdentityError):
    hint = "connect with the device's client certificate (mTLS); see docs/tpm.md"


class WrongDevice(IdentityError):
    hint = "a device certificate is valid only for the controllerId it names"


class CertificateRefused(TransportError):
    """The controller ended the TLS handshake over our client certificate (expired, revoked...).

    A TransportError, not an IdentityError: the device's own side is fine and renewing (or the
    caller's backoff) may fix it, so the fleet loop retries instead of giving up."""

    hint = "renew the certificate ('edgeops tpm renew'); a revoked device must be re-enrolled"


# --- the device --------------------------------------------------------------
class DeviceError(EdgeopsError):
    hint = "check the storage and bootloader configuration ('edgeops status')"


class SlotError(DeviceError):
    pass


class BootloaderError(DeviceError):
    pass


class JournalLost(DeviceError):
    """The journal is not the one its witness knows: lost, emptied or replaced (agent.core.witness)."""

    hint = "run 'edgeops journal recover': it rebuilds the journal from its witness, never lowering the floor"


class StateError(EdgeopsError):
    """The request does not fit the device's current state."""

    hint = "see 'edgeops status'"


class DeviceBusy(StateError):
    """Another edgeops process holds the device lock."""

    hint = "wait for the running install or agent cycle to finish"


class HealthCheckFailed(EdgeopsError):
    hint = "see 'edgeops history' for the failing probe"


# Model updater errors, each under the root that fits it: a malformed, unloadable or
# invalid model is bad bytes (BundleError: never retried); one too large for the budget is a
# PayloadTooLarge; a missing interpreter or a broken store is the device's problem
# (DeviceError). The CLI's exit-code table therefore needs no entry of its own for them.
class ModelMetaError(ManifestError):
    """The ``meta`` of a model payload is missing a field or malformed."""

    hint = "build the model bundle with the fields listed in docs/models.md"


class ModelBundleError(IncompatibleBundle):
    """The bundle is signed and sound but is not a model bundle this agent accepts."""

    hint = "a model bundle holds one 'model' payload and one 'model-validation' payload"


class ModelInvalid(BundleError):
    """The model bytes were delivered intact but the model is not usable."""

    hint = "the model was not activated; fix the model or its validation set and rebuild the bundle"


class ModelLoadError(ModelInvalid):
    """The interpreter refused the file (not TFLite, truncated, unsupported op)."""


class ModelShapeMismatch(ModelInvalid):
    """Input or output tensors differ from what the manifest promises."""


class ValidationSetError(ModelInvalid):
    """The validation set is malformed or does not fit the model."""


class ModelOutputMismatch(ModelInvalid):
    """Validation outputs are outside the stated tolerance."""


class ModelTooSlow(ModelInvalid):
    """Validation inference is slower than the stated latency ceiling."""

    hint = "the model was not activated; raise max_latency_ms only if the slower model is acceptable"


class ModelTooLarge(PayloadTooLarge):
    hint = "raise models.budget_bytes, lower models.keep, or ship a smaller model"


class ModelRuntimeMissing(DeviceError):
    hint = "install the interpreter: pip install 'edgeops[tflite]' (or tflite-runtime with numpy<2)"


class ModelStoreError(DeviceError):
    hint = "check the model store under the state directory ('edgeops model status')"


class ModelStateError(StateError):
    hint = "see 'edgeops model status'"


class ModelHealthFailed(HealthCheckFailed):
    hint = "the previous model was restored; see 'edgeops history' for the reason"
