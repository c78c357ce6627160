"""TFLite models as updates of their own: verified, validated, swapped atomically, reverted.

See docs/models.md. Modules: ``spec`` (what a model promises), ``validate`` (the real
interpreter proves it), ``store`` (versioned directories and atomic links), ``health``
(pure post-swap verdicts), ``manager`` (the shell). ``agent.modelhost`` is the
in-application hot-swap library. Nothing here imports numpy or the interpreter at
import time.
"""

from __future__ import annotations

from agent.models.errors import (
    ModelBundleError,
    ModelHealthFailed,
    ModelInvalid,
    ModelLoadError,
    ModelMetaError,
    ModelOutputMismatch,
    ModelRuntimeMissing,
    ModelShapeMismatch,
    ModelStateError,
    ModelStoreError,
    ModelTooLarge,
    ModelTooSlow,
    ValidationSetError,
)
from agent.models.health import Decision, HealthPolicy, WindowStats, decide
from agent.models.manager import (
    InstallResult,
    ModelManager,
    ModelSettings,
    settings_from_config,
    settings_from_dict,
)
from agent.models.spec import MODEL_CLASS, VALIDATION_CLASS, ModelSpec, TensorSpec, spec_from_meta
from agent.models.store import ModelStore, VersionInfo

__all__ = [
    "MODEL_CLASS", "VALIDATION_CLASS", "Decision", "HealthPolicy", "InstallResult",
    "ModelBundleError", "ModelHealthFailed", "ModelInvalid", "ModelLoadError", "ModelManager",
    "ModelMetaError", "ModelOutputMismatch", "ModelRuntimeMissing", "ModelSettings",
    "ModelShapeMismatch", "ModelSpec", "ModelStateError", "ModelStore", "ModelStoreError",
    "ModelTooLarge", "ModelTooSlow", "TensorSpec", "ValidationSetError", "VersionInfo", "WindowStats",
    "decide", "settings_from_config", "settings_from_dict", "spec_from_meta",
]
