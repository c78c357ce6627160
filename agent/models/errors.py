"""Typed errors of the model updater, each under the spine's root that fits it.

A model that is malformed, fails to load or fails validation is bad bytes
(``BundleError``: never retried); a model too large for the budget is a
``PayloadTooLarge``; a missing interpreter or a broken store is the device's
problem (``DeviceError``). The CLI's exit-code table therefore needs no change.
"""

from __future__ import annotations

from agent.errors import (
    BundleError,
    DeviceError,
    HealthCheckFailed,
    IncompatibleBundle,
    ManifestError,
    PayloadTooLarge,
    StateError,
)


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
