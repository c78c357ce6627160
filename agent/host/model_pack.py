"""Host side: build a signed model-only bundle (model + validation set) with agent.adapters.bundle.

The tensor specs in the payload meta are read from the model with the real
interpreter unless given, so the manifest cannot drift from the file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from agent.adapters import tflite as validate_mod
from agent.core.manifest import Manifest
from agent.core.model_spec import MODEL_CLASS, VALIDATION_CLASS, ModelSpec
from agent.host import bundle_writer


def spec_for(model: bytes, *, atol: float, rtol: float, max_latency_ms: float,
             validation: str) -> ModelSpec:
    ins, outs = validate_mod.tensor_specs(validate_mod.load(model))
    return ModelSpec(ins, outs, atol, rtol, max_latency_ms, validation)


def pack(out: Path, *, model: Path, validation: Path, name: str, version: str,
         sign: Callable[[bytes], bytes], chain_pem: bytes, compatible: str,
         security_version: int = 0, spec: ModelSpec | None = None, atol: float = 1e-5,
         rtol: float = 0.0, max_latency_ms: float = 100.0, build_time: int | None = None,
         description: str = "") -> Manifest:
    val_name = f"{name}-val"[:32]
    if spec is None:
        spec = spec_for(model.read_bytes(), atol=atol, rtol=rtol, max_latency_ms=max_latency_ms,
                        validation=val_name)
    sources = [
        bundle_writer.PayloadSource(name, MODEL_CLASS, model, meta=spec.to_meta()),
        bundle_writer.PayloadSource(spec.validation, VALIDATION_CLASS, validation),
    ]
    return bundle_writer.create(out, sign=sign, chain_pem=chain_pem, compatible=compatible,
                         version=version, security_version=security_version,
                         build_time=int(time.time()) if build_time is None else build_time,
                         sources=sources, description=description)
