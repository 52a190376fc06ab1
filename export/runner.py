"""Drive an exported model step by step from its schedule, carrying the state between calls.

The exported graph is stateless: each call takes the model inputs, the current step's skip
mask and the state tensors, and returns the outputs and the new state.  A runner keeps that
state, counts steps (a new generation starts at the first call, after :meth:`reset`, when the
timestep goes up or is not finite, or when the input the graph's clock watches jumps by more than
its norm: the rule of :mod:`fx_fastcache.runtime.generation`, as in the PyTorch model) and feeds
``schedule.row(step)``.
Backends only map a dict of numpy arrays to a dict of numpy arrays: onnxruntime here,
TensorRT in :mod:`fx_fastcache.export.tensorrt`.

A runner is called like the original model (``runner(**kwargs)`` returns a tuple whose first
element is the output), so ``fx_fastcache.trained.sample(tm, ..., model=runner)`` samples
with it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from fx_fastcache.families import timestep_arg
from fx_fastcache.passes.explicit_state import ExplicitStateSpec
from fx_fastcache.runtime.generation import (input_jumped_host, repeated_call_host, scalar_timestep,
                                             starts_generation_host)

from .onnx import read_runner_metadata
from .schedule import Schedule

logger = logging.getLogger(__name__)

_NP = {"torch.float32": np.float32, "torch.float16": np.float16, "torch.int64": np.int64, "torch.bool": np.bool_,
       "torch.int32": np.int32, "torch.float64": np.float64}


class Backend(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OrtBackend:
    """onnxruntime session (CPU unless ``providers`` says otherwise)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int = 0) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}  # unused inputs are pruned
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


class ScheduleRunner:
    """Runs a stateless exported model over a generation, step by step, from a schedule.

    ``stream_input`` is the input the graph's clock compared between calls (``OnnxExport.stream_input``,
    stored in the ONNX file); ``None``: none, and only the timestep starts a new generation.
    """

    def __init__(self, backend: Backend, spec: ExplicitStateSpec, schedule: Schedule,
                 stream_input: str | None = None) -> None:
        if schedule.blocks != spec.blocks:
            raise ValueError(f"schedule blocks {schedule.blocks[:3]}... ({len(schedule.blocks)}) do not match the "
                             f"exported model's {spec.blocks[:3]}... ({len(spec.blocks)})")
        for span in spec.guarded:  # one If per span: its blocks must share the schedule's column
            cols = {tuple(row[j] for row in schedule.table) for j in span}
            if len(cols) > 1:
                raise ValueError(f"the schedule skips blocks {span[0]}..{span[-1]} at different steps, but the model "
                                 f"was exported with them as one guarded span; export again with this schedule")
        if stream_input is not None and stream_input not in spec.inputs:
            raise ValueError(f"stream_input={stream_input!r} is not an input of the exported model {spec.inputs}; "
                             f"pass the one its clock watched (OnnxExport.stream_input)")
        self.backend = backend
        self.spec = spec
        self.schedule = schedule
        self.timestep_input = timestep_arg(spec.inputs)
        self.stream_input = stream_input
        self.reset()

    def reset(self) -> None:
        """Start a new generation at the next call (state zero, step 0)."""
        self.state = [s.zeros().numpy() for s in self.spec.state]
        self.step = -1
        self.t_last: float | None = None
        self.x_last: np.ndarray | None = None
        self.repeated = False  # a repeated call since the generation began (see run_step)

    def _to_np(self, name: str, v: Any) -> np.ndarray:
        want = self.spec.input_shapes[name]
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        a = np.asarray(v, dtype=_NP.get(self.spec.input_dtypes[name]))
        if tuple(a.shape) != tuple(want):
            raise ValueError(f"input {name!r} has shape {tuple(a.shape)} but the model was exported for {tuple(want)}; "
                             f"export again with these shapes")
        return a

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        if args:
            raise TypeError("call the runner with keyword arguments, like the original model")
        missing = [n for n in self.spec.inputs if n not in kwargs]
        if missing:
            raise TypeError(f"missing input(s) {missing}; the exported model takes {self.spec.inputs}")
        feeds = {n: self._to_np(n, kwargs[n]) for n in self.spec.inputs}
        outs = self.run_step(feeds)
        return tuple(torch.from_numpy(np.ascontiguousarray(o)) for o in outs)

    def run_step(self, feeds: dict[str, np.ndarray], skip: np.ndarray | None = None) -> list[np.ndarray]:
        """One call: advance the step (or start a generation), run, keep the new state."""
        t = float(scalar_timestep(torch.as_tensor(feeds[self.timestep_input]))) if self.timestep_input else None
        x = feeds[self.stream_input] if self.stream_input else None
        if starts_generation_host(t, self.t_last if self.step >= 0 else None) or (
                x is not None and input_jumped_host(x, self.x_last)):
            self.state = [s.zeros().numpy() for s in self.spec.state]
            self.step = 0
            self.repeated = False
        else:
            self.step += 1
            # CFG as two calls per step: computes every block until the next generation, as the clock does
            self.repeated = self.repeated or repeated_call_host(t, self.t_last, x, self.x_last)
        if t is not None:
            self.t_last = t
        if x is not None:
            self.x_last = np.array(x, copy=True)  # the feed may share memory with a tensor the caller updates
        if skip is not None:
            mask = np.asarray(skip, dtype=np.bool_)
        else:
            mask = self.schedule.row(self.step).numpy() & (not self.repeated)
        out = self.backend.run({**feeds, "skip": mask, **dict(zip((s.input_name for s in self.spec.state), self.state))})
        self.state = [out[s.output_name] for s in self.spec.state]
        return [out[n] for n in self.spec.outputs]


class OnnxRunner(ScheduleRunner):
    """:class:`ScheduleRunner` on onnxruntime for a file written by ``fx-fastcache export-onnx``.

    ``schedule`` defaults to the one stored in the file; another one must match its blocks.
    """

    def __init__(self, path: str | Path, schedule: Schedule | None = None, providers: list[str] | None = None,
                 threads: int = 0) -> None:
        spec, stored, stream_input = read_runner_metadata(path)
        self.path = Path(path)
        bf16 = [n for n, d in spec.input_dtypes.items() if d == "torch.bfloat16"]
        if bf16:  # (its session failed to load: "Type 'tensor(bfloat16)' ... of operator (Conv) ... is invalid")
            raise ValueError(f"{str(path)!r} was exported from a bfloat16 model (inputs {bf16}), and onnxruntime "
                             f"has no bfloat16 kernels for most operators (convolutions, matmuls): export the model "
                             f"in float16 or float32 to run it here (TensorRT builds bfloat16 engines)")
        super().__init__(OrtBackend(path, providers, threads), spec, schedule or stored, stream_input)
