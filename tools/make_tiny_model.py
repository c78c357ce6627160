#!/usr/bin/env python3
"""Build a tiny, real TFLite model without TensorFlow: one FULLY_CONNECTED layer.

    y = x @ W.T + b        x: float32 [1, IN], W: float32 [OUT, IN], b: float32 [OUT]

The weights are chosen here, so every expected output is known exactly and the
tests compute them with numpy instead of hard-coding numbers. The file is a
plain TFLite flatbuffer written with the ``tflite`` schema package and
``flatbuffers`` (schema: tensorflow/lite/schema/schema.fbs, file identifier
"TFL3", schema version 3).

    python tools/make_tiny_model.py tests/fixtures/tiny_fc.tflite   # the committed fixture
    python tools/make_tiny_model.py OUT --scale 2 --validation OUT.npz
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import flatbuffers
import numpy as np
import tflite
from numpy.typing import NDArray

IN, OUT = 4, 3
SCHEMA_VERSION = 3
FILE_IDENTIFIER = b"TFL3"


def weights(scale: float = 1.0, in_features: int = IN, out_features: int = OUT
            ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The fixture's weights: small exact binary fractions, so float32 sums are exact too."""
    n = out_features * in_features
    w = ((np.arange(n, dtype=np.float64) % 16 - 5.0) / 4.0).reshape(out_features, in_features)
    b = np.resize(np.array([0.5, -1.0, 0.25]), out_features)
    return (w * scale).astype(np.float32), (b * scale).astype(np.float32)


def expected(x: NDArray[np.float32], scale: float = 1.0, out_features: int = OUT
             ) -> NDArray[np.float32]:
    w, b = weights(scale, x.shape[-1], out_features)
    return (x @ w.T + b).astype(np.float32)


def _vector(builder: flatbuffers.Builder, start: object, values: list[int]) -> int:
    start(builder, len(values))  # type: ignore[operator]
    for v in reversed(values):
        builder.PrependInt32(v)
    return int(builder.EndVector())


def _offsets(builder: flatbuffers.Builder, start: object, offsets: list[int]) -> int:
    start(builder, len(offsets))  # type: ignore[operator]
    for o in reversed(offsets):
        builder.PrependUOffsetTRelative(o)
    return int(builder.EndVector())


def _buffer(builder: flatbuffers.Builder, data: bytes) -> int:
    data_off = builder.CreateByteVector(data) if data else None
    tflite.BufferStart(builder)
    if data_off is not None:
        tflite.BufferAddData(builder, data_off)
    return int(tflite.BufferEnd(builder))


def _tensor(builder: flatbuffers.Builder, name: str, shape: list[int], buffer: int) -> int:
    name_off = builder.CreateString(name)
    shape_off = _vector(builder, tflite.TensorStartShapeVector, shape)
    tflite.TensorStart(builder)
    tflite.TensorAddShape(builder, shape_off)
    tflite.TensorAddType(builder, tflite.TensorType.FLOAT32)
    tflite.TensorAddBuffer(builder, buffer)
    tflite.TensorAddName(builder, name_off)
    return int(tflite.TensorEnd(builder))


def build(scale: float = 1.0, *, in_features: int = IN, out_features: int = OUT) -> bytes:
    """The model as bytes. Other feature counts give other shapes (and, large, a heavier model)."""
    w, b = weights(scale, in_features, out_features)
    builder = flatbuffers.Builder(1024 + w.nbytes + b.nbytes)
    # Buffer 0 is the empty sentinel every TFLite model starts with.
    buffers = [_buffer(builder, b""), _buffer(builder, w.tobytes()), _buffer(builder, b.tobytes())]
    tensors = [
        _tensor(builder, "input", [1, in_features], 0),
        _tensor(builder, "weights", [out_features, in_features], 1),
        _tensor(builder, "bias", [out_features], 2),
        _tensor(builder, "output", [1, out_features], 0),
    ]
    tflite.FullyConnectedOptionsStart(builder)
    tflite.FullyConnectedOptionsAddFusedActivationFunction(builder, tflite.ActivationFunctionType.NONE)
    fc_options = tflite.FullyConnectedOptionsEnd(builder)
    op_inputs = _vector(builder, tflite.OperatorStartInputsVector, [0, 1, 2])
    op_outputs = _vector(builder, tflite.OperatorStartOutputsVector, [3])
    tflite.OperatorStart(builder)
    tflite.OperatorAddOpcodeIndex(builder, 0)
    tflite.OperatorAddInputs(builder, op_inputs)
    tflite.OperatorAddOutputs(builder, op_outputs)
    tflite.OperatorAddBuiltinOptionsType(builder, tflite.BuiltinOptions.FullyConnectedOptions)
    tflite.OperatorAddBuiltinOptions(builder, fc_options)
    operator = tflite.OperatorEnd(builder)

    tensors_off = _offsets(builder, tflite.SubGraphStartTensorsVector, tensors)
    sg_inputs = _vector(builder, tflite.SubGraphStartInputsVector, [0])
    sg_outputs = _vector(builder, tflite.SubGraphStartOutputsVector, [3])
    ops_off = _offsets(builder, tflite.SubGraphStartOperatorsVector, [operator])
    sg_name = builder.CreateString("main")
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, tensors_off)
    tflite.SubGraphAddInputs(builder, sg_inputs)
    tflite.SubGraphAddOutputs(builder, sg_outputs)
    tflite.SubGraphAddOperators(builder, ops_off)
    tflite.SubGraphAddName(builder, sg_name)
    subgraph = tflite.SubGraphEnd(builder)

    # Both opcode fields are set: deprecated_builtin_code is what older runtimes read.
    tflite.OperatorCodeStart(builder)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddBuiltinCode(builder, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddVersion(builder, 1)
    opcode = tflite.OperatorCodeEnd(builder)

    opcodes_off = _offsets(builder, tflite.ModelStartOperatorCodesVector, [opcode])
    subgraphs_off = _offsets(builder, tflite.ModelStartSubgraphsVector, [subgraph])
    buffers_off = _offsets(builder, tflite.ModelStartBuffersVector, buffers)
    desc = builder.CreateString("edgeops tiny fully-connected test model")
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(builder, opcodes_off)
    tflite.ModelAddSubgraphs(builder, subgraphs_off)
    tflite.ModelAddBuffers(builder, buffers_off)
    tflite.ModelAddDescription(builder, desc)
    model = tflite.ModelEnd(builder)
    builder.Finish(model, file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def validation_set(scale: float = 1.0, cases: int = 8, *, seed: int = 7) -> bytes:
    """An .npz validation set (docs/models.md): input_0 [N,1,IN] and output_0 [N,1,OUT]."""
    rng = np.random.default_rng(seed)
    x = (rng.integers(-8, 8, size=(cases, 1, IN)) / 2.0).astype(np.float32)
    y = np.stack([expected(case, scale) for case in x]).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, input_0=x, output_0=y)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply weights and bias by this")
    ap.add_argument("--validation", type=Path, help="also write a matching .npz validation set")
    a = ap.parse_args(argv)
    a.out.write_bytes(build(a.scale))
    if a.validation:
        a.validation.write_bytes(validation_set(a.scale))
    print(f"wrote {a.out} ({a.out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
