"""Load a model with the real TFLite interpreter and prove it before it is used.

Interpreter use follows the LiteRT Python guide ("Run inference with LiteRT
in Python"): ``Interpreter(model_content=...)``, ``allocate_tensors()``,
``get_input_details()``/``get_output_details()`` for index, shape and dtype,
``set_tensor``/``invoke``/``get_tensor``. An interpreter is not safe to call
from two threads at once, so callers serialise use of one ``Runner``.
The runtime is imported lazily, so the agent imports on devices without it.
"""

from __future__ import annotations

import importlib
import statistics
import time
from dataclasses import dataclass
from typing import Any

from agent.core.model_spec import ModelSpec, TensorSpec, ValidationSet
from agent.errors import (
    ModelLoadError,
    ModelOutputMismatch,
    ModelRuntimeMissing,
    ModelShapeMismatch,
    ModelTooSlow,
)

RUNTIMES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")  # preferred first
TFLITE_IDENT = b"TFL3"  # flatbuffer file identifier at bytes 4..8 of every .tflite file


def interpreter_class() -> Any:
    """The Interpreter class of whichever runtime is installed: LiteRT first, then tflite-runtime."""
    for module in RUNTIMES:
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            continue
    raise ModelRuntimeMissing("no TFLite interpreter is installed (ai-edge-litert or tflite-runtime)")


@dataclass
class Runner:
    """One loaded interpreter with its tensor indices resolved once."""

    interpreter: Any
    input_index: tuple[int, ...]
    output_index: tuple[int, ...]

    def run(self, inputs: list[Any] | tuple[Any, ...]) -> list[Any]:
        it = self.interpreter
        for idx, value in zip(self.input_index, inputs, strict=True):
            it.set_tensor(idx, value)
        it.invoke()
        # get_tensor copies, so results stay valid after the next invoke
        return [it.get_tensor(idx) for idx in self.output_index]


def load(data: bytes, *, num_threads: int = 1) -> Runner:
    """Build an interpreter from model bytes; any refusal becomes ModelLoadError."""
    if len(data) < 8 or data[4:8] != TFLITE_IDENT:
        # cheap first gate: the interpreter's flatbuffer verifier is the real one
        raise ModelLoadError("model is not a TFLite flatbuffer (no 'TFL3' identifier)")
    cls = interpreter_class()
    try:
        it = cls(model_content=data, num_threads=num_threads)
        it.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"the TFLite interpreter refused the model: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    ins = it.get_input_details()
    outs = it.get_output_details()
    return Runner(it, tuple(d["index"] for d in ins), tuple(d["index"] for d in outs))


def tensor_specs(runner: Runner) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    import numpy as np

    def specs(details: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(tuple(int(d) for d in t["shape"]), np.dtype(t["dtype"]).name)
                     for t in details)

    it = runner.interpreter
    return specs(it.get_input_details()), specs(it.get_output_details())


def check_tensors(runner: Runner, spec: ModelSpec) -> None:
    got_in, got_out = tensor_specs(runner)
    for what, got, want in (("inputs", got_in, spec.inputs), ("outputs", got_out, spec.outputs)):
        if got != want:
            raise ModelShapeMismatch(
                f"model {what} are {', '.join(t.describe() for t in got)}; the manifest says "
                f"{', '.join(t.describe() for t in want)}")


@dataclass(frozen=True)
class ValidationReport:
    cases: int
    max_abs_error: float
    median_ms: float
    max_ms: float


def run_validation(runner: Runner, vset: ValidationSet, spec: ModelSpec) -> ValidationReport:
    """Every case within atol + rtol*|want|, and the median invoke time under the ceiling.

    The median, not the maximum, is held to the ceiling: one scheduler hiccup on
    a busy device must not refuse a good model, while a model that is truly too
    slow is slow on most cases.
    """
    import numpy as np

    runner.run([a[0] for a in vset.inputs])  # warm-up: first invoke pays one-off allocation
    times, worst = [], 0.0
    for case in range(vset.cases):
        t0 = time.perf_counter()
        got = runner.run([a[case] for a in vset.inputs])
        times.append((time.perf_counter() - t0) * 1000.0)
        for j, want_all in enumerate(vset.outputs):
            want = want_all[case].astype(np.float64)
            g = got[j].astype(np.float64)
            err = np.abs(g - want)
            worst = max(worst, float(err.max(initial=0.0)))
            if not np.all(err <= spec.atol + spec.rtol * np.abs(want)):
                raise ModelOutputMismatch(
                    f"validation case {case} output {j} is off by {float(err.max()):.6g} "
                    f"(tolerance atol={spec.atol:g}, rtol={spec.rtol:g})")
    median = statistics.median(times)
    if median > spec.max_latency_ms:
        raise ModelTooSlow(f"validation inference takes {median:.3f} ms (median of "
                           f"{len(times)}), above the ceiling of {spec.max_latency_ms:g} ms")
    return ValidationReport(vset.cases, worst, median, max(times))


def validate(model: bytes, vset: ValidationSet, spec: ModelSpec) -> ValidationReport:
    runner = load(model)
    check_tensors(runner, spec)
    return run_validation(runner, vset, spec)
