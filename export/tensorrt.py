"""TensorRT engines from the exported ONNX, and a runner backend for them (isolated path).

Everything TensorRT-specific lives in this file and imports ``tensorrt`` inside functions.
What the ONNX export does for TensorRT's conditional layer (``IIfConditional``): the ``If``
condition is a 0-d bool tensor (``skip[i]``), both branches return outputs of the same
shapes and dtypes (contiguous clones), and no state lives in the graph (state tensors are
inputs and outputs, so nothing is frozen into weights).

Not run in this repository's CI (no GPU, and ``tensorrt`` does not install without CUDA):
:func:`require_tensorrt` fails at once, saying which of ``tensorrt`` / a CUDA device is
missing and how to get it.  See docs/EXPORT.md for what has and has not been run.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fx_fastcache.passes.explicit_state import ExplicitStateSpec

from .onnx import read_runner_metadata
from .runner import ScheduleRunner
from .schedule import Schedule

logger = logging.getLogger(__name__)

INSTALL_TRT = ("install TensorRT 10 on a machine with an NVIDIA GPU: `pip install tensorrt` "
               "(or `pip install fx-fastcache[tensorrt]`); see https://docs.nvidia.com/deeplearning/tensorrt/")
INSTALL_CUDA = ("TensorRT needs an NVIDIA GPU with a working CUDA driver (torch.cuda.is_available() is False here); "
                "run on a CUDA machine with a CUDA build of torch")


class TensorRTUnavailable(RuntimeError):
    """``tensorrt`` or a CUDA device is missing."""


def missing_requirements() -> list[str]:
    """Human-readable reasons TensorRT cannot run here (empty when it can)."""
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append(f"the Python package 'tensorrt' is not installed: {INSTALL_TRT}")
    if not torch.cuda.is_available():
        missing.append(f"no CUDA device: {INSTALL_CUDA}")
    return missing


def require_tensorrt() -> None:
    missing = missing_requirements()
    if missing:
        raise TensorRTUnavailable("TensorRT cannot run here:\n  - " + "\n  - ".join(missing))


@dataclass
class ProfileRange:
    """min / opt / max of one dimension in the optimisation profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"profile range must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


def build_engine(onnx_path: str | Path, out: str | Path, fp16: bool = False, bf16: bool = False,
                 workspace_gib: float = 4.0, batch: ProfileRange | None = None,
                 tokens: ProfileRange | None = None) -> Path:
    """Build a serialized engine at ``out`` (and ``out.json`` with the runner's metadata).

    ``batch`` / ``tokens`` set the optimisation profile of dynamic dimension 0 / 1 of the
    inputs that have them; a fixed-shape export gets a profile with min = opt = max.
    """
    require_tensorrt()
    import tensorrt as trt

    if fp16 and bf16:
        raise ValueError("choose one of --fp16 and --bf16")
    if workspace_gib <= 0:
        raise ValueError(f"workspace must be > 0 GiB, got {workspace_gib}")
    spec, schedule, stream_input = read_runner_metadata(onnx_path)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n" + "\n".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if bf16:
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = list(inp.shape)
        lo, mid, hi = list(shape), list(shape), list(shape)
        for d, size in enumerate(shape):
            rng = batch if d == 0 else tokens if d == 1 else None
            if size == -1 and rng is None:
                raise ValueError(f"input {inp.name} has a dynamic dimension {d}; give its range (--batch/--tokens)")
            if size == -1:
                lo[d], mid[d], hi[d] = rng.min, rng.opt, rng.max
        profile.set_shape(inp.name, lo, mid, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(serialized))
    Path(str(out) + ".json").write_text(json.dumps({"spec": spec.to_dict(), "schedule": schedule.to_dict(),
                                                    "stream_input": stream_input,
                                                    "precision": "fp16" if fp16 else "bf16" if bf16 else "fp32"}))
    logger.info("wrote TensorRT engine %s", out)
    return out


class TrtBackend:
    """Runs a serialized engine with torch CUDA tensors as I/O buffers (name-based TensorRT 10 API)."""

    def __init__(self, plan: str | Path) -> None:
        require_tensorrt()
        import tensorrt as trt

        self.torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan}: TensorRT could not deserialize the engine (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.stream = torch.cuda.Stream()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        bufs = {}
        for n in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[n])).cuda()
            self.context.set_input_shape(n, tuple(t.shape))
            bufs[n] = t
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            dtype = torch.from_numpy(np.zeros((), dtype=_trt_np(self.engine.get_tensor_dtype(n), n))).dtype
            bufs[n] = torch.empty(shape, dtype=dtype, device="cuda")
        for n, t in bufs.items():
            self.context.set_tensor_address(n, t.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return {n: bufs[n].cpu().numpy() for n in self.outputs}


def _trt_np(dtype, name: str = "?") -> type:
    """The numpy dtype of a TensorRT I/O tensor; a dtype numpy cannot hold (bf16, fp8) raises instead of
    being read as float32."""
    import tensorrt as trt

    known = {trt.float32: np.float32, trt.float16: np.float16, trt.bool: np.bool_, trt.int64: np.int64,
             trt.int32: np.int32}
    if dtype not in known:
        raise TypeError(f"TensorRT engine output {name!r} has dtype {dtype}, which the runner cannot return as a "
                        f"numpy array; build the engine with fp32 or fp16 outputs (export-trt without --bf16)")
    return known[dtype]


class TensorRTRunner(ScheduleRunner):
    """:class:`ScheduleRunner` on a TensorRT engine written by ``fx-fastcache export-trt``."""

    def __init__(self, plan: str | Path, schedule=None) -> None:
        side = Path(str(plan) + ".json")
        if not side.is_file():
            raise FileNotFoundError(f"{side} (written next to the engine by `fx-fastcache export-trt`) is missing")
        meta = json.loads(side.read_text())
        if "stream_input" not in meta:
            raise ValueError(f"{side} has no 'stream_input' (the input the new-generation rule watches): it was "
                             f"built by an older fx-fastcache; build the engine again with `fx-fastcache export-trt`")
        spec = ExplicitStateSpec.from_dict(meta["spec"])
        super().__init__(TrtBackend(plan), spec, schedule or Schedule.from_dict(meta["schedule"]), meta["stream_input"])
