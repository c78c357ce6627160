"""What a model promises (the ``meta`` of its payload) and its validation set. Pure: bytes in.

Payload meta of class ``model`` (bounded to 8 KiB by agent.core.manifest)::

    {"inputs":  [{"shape": [1, 4], "dtype": "float32"}],
     "outputs": [{"shape": [1, 3], "dtype": "float32"}],
     "atol": 1e-5, "rtol": 0.0,          # |got - want| <= atol + rtol * |want|
     "max_latency_ms": 20.0,             # median invoke time on the validation set
     "validation": "tiny-val"}           # name of the 'model-validation' payload

The validation set is an uncompressed or deflated ``.npz`` (numpy's zip of
.npy arrays, loaded with allow_pickle=False) holding ``input_<i>`` of shape
[N, *inputs[i].shape] and ``output_<j>`` of shape [N, *outputs[j].shape].
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass
from typing import Any

from agent.errors import ModelMetaError, ValidationSetError

MODEL_CLASS = "model"
VALIDATION_CLASS = "model-validation"
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")
MAX_TENSORS = 16
MAX_RANK = 8
MAX_CASES = 10_000
MAX_VALIDATION_BYTES = 64 << 20  # uncompressed: a deflated .npz must not expand without bound


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass(frozen=True)
class ModelSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: float
    rtol: float
    max_latency_ms: float
    validation: str

    def to_meta(self) -> dict[str, Any]:
        def t(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
            return [{"shape": list(s.shape), "dtype": s.dtype} for s in specs]

        return {"inputs": t(self.inputs), "outputs": t(self.outputs), "atol": self.atol,
                "rtol": self.rtol, "max_latency_ms": self.max_latency_ms,
                "validation": self.validation}


def spec_from_meta(meta: dict[str, Any], where: str) -> ModelSpec:
    """Parse a model payload's meta; raises ModelMetaError naming the first bad field."""
    known = {"inputs", "outputs", "atol", "rtol", "max_latency_ms", "validation"}
    unknown = set(meta) - known
    if unknown:
        raise ModelMetaError(f"{where}.meta has unknown keys {', '.join(sorted(unknown))}")
    validation = meta.get("validation")
    if not isinstance(validation, str) or not validation:
        raise ModelMetaError(f"{where}.meta.validation must name the validation payload")
    return ModelSpec(
        inputs=_tensors(meta.get("inputs"), f"{where}.meta.inputs"),
        outputs=_tensors(meta.get("outputs"), f"{where}.meta.outputs"),
        atol=_number(meta.get("atol"), f"{where}.meta.atol", 0.0, 1e9),
        rtol=_number(meta.get("rtol", 0.0), f"{where}.meta.rtol", 0.0, 1e9),
        max_latency_ms=_number(meta.get("max_latency_ms"), f"{where}.meta.max_latency_ms", 1e-6, 1e7),
        validation=validation,
    )


def _tensors(value: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TENSORS:
        raise ModelMetaError(f"{where} must be a list of 1 to {MAX_TENSORS} tensors")
    out = []
    for i, t in enumerate(value):
        if not isinstance(t, dict) or set(t) != {"shape", "dtype"}:
            raise ModelMetaError(f"{where}[{i}] must be {{'shape': [...], 'dtype': '...'}}")
        shape = t["shape"]
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(type(d) is int and 1 <= d <= 1 << 24 for d in shape)):
            raise ModelMetaError(f"{where}[{i}].shape must be a list of at most {MAX_RANK} "
                                 f"positive integers")
        if t["dtype"] not in DTYPES:
            raise ModelMetaError(f"{where}[{i}].dtype must be one of {', '.join(DTYPES)}")
        out.append(TensorSpec(tuple(shape), t["dtype"]))
    return tuple(out)


def _number(value: Any, where: str, lo: float, hi: float) -> float:
    if type(value) not in (int, float) or not (lo <= value <= hi) or math.isnan(value):
        raise ModelMetaError(f"{where} must be a number from {lo:g} to {hi:g}")
    return float(value)


# --- the validation set -------------------------------------------------------------------------
@dataclass(frozen=True)
class ValidationSet:
    inputs: tuple[Any, ...]  # numpy arrays [N, *shape], one per model input
    outputs: tuple[Any, ...]  # numpy arrays [N, *shape], one per model output

    @property
    def cases(self) -> int:
        return int(self.inputs[0].shape[0])


def load_validation(data: bytes, spec: ModelSpec) -> ValidationSet:
    """Parse and check a validation .npz against the spec. Needs numpy (the [tflite] extra)."""
    import numpy as np

    _check_zip_bounds(data)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, MemoryError) as exc:
        raise ValidationSetError(f"validation set is not a readable .npz: {exc}") from None
    ins = tuple(_array(arrays, f"input_{i}", s) for i, s in enumerate(spec.inputs))
    outs = tuple(_array(arrays, f"output_{j}", s) for j, s in enumerate(spec.outputs))
    counts = {a.shape[0] for a in (*ins, *outs)}
    if len(counts) != 1 or not 1 <= counts.pop() <= MAX_CASES:
        raise ValidationSetError(f"validation arrays must all hold the same number of cases, "
                                 f"1 to {MAX_CASES}")
    extra = set(arrays) - {f"input_{i}" for i in range(len(ins))} - {f"output_{j}" for j in
                                                                      range(len(outs))}
    if extra:
        raise ValidationSetError(f"validation set has unexpected arrays {', '.join(sorted(extra))}")
    return ValidationSet(ins, outs)


def _check_zip_bounds(data: bytes) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
    except zipfile.BadZipFile as exc:
        raise ValidationSetError(f"validation set is not a .npz (zip) file: {exc}") from None
    total = sum(i.file_size for i in infos)
    if len(infos) > 2 * MAX_TENSORS or total > MAX_VALIDATION_BYTES:
        raise ValidationSetError(f"validation set expands to {total} bytes in {len(infos)} arrays, "
                                 f"more than {MAX_VALIDATION_BYTES} bytes or {2 * MAX_TENSORS} arrays")
    for info in infos:
        _check_npy_header(data, info)


def _check_npy_header(data: bytes, info: zipfile.ZipInfo) -> None:
    """numpy allocates what an .npy header's shape says before it reads a byte of data: the
    shape must fit in the bytes the member actually holds."""
    import math

    import numpy as np

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z, z.open(info) as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(f)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, TypeError) as exc:
        raise ValidationSetError(f"validation array '{info.filename}' has no valid .npy header: "
                                 f"{exc}") from None
    need = math.prod(shape) * dtype.itemsize
    if need > info.file_size or need > MAX_VALIDATION_BYTES:
        raise ValidationSetError(f"validation array '{info.filename}' declares shape {list(shape)} "
                                 f"({need} bytes) but holds {info.file_size} bytes")


def _array(arrays: dict[str, Any], key: str, spec: TensorSpec) -> Any:
    a = arrays.get(key)
    if a is None:
        raise ValidationSetError(f"validation set lacks array '{key}'")
    if a.dtype.name != spec.dtype or tuple(a.shape[1:]) != spec.shape:
        raise ValidationSetError(f"validation array '{key}' is {a.dtype.name}{list(a.shape)}, "
                                 f"expected {spec.dtype}[N, {', '.join(map(str, spec.shape))}]")
    return a
