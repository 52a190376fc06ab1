"""ONNX export of the rewritten model driven by a skip schedule, with explicit state.

Why not ``torch.onnx.export(opt)``: the optimized model keeps its state (cached residuals,
step counter) in buffers it updates in place; ONNX would freeze them into constants and drop
the updates without a word.  Here the graph is captured with ``policy="schedule"``, turned
stateless by :func:`fx_fastcache.passes.explicit_state.explicit_state` (skip mask and every
fallback state tensor become inputs, the new state becomes outputs) and exported with the
dynamo exporter.  Each guarded span (one block, or consecutive blocks with equal schedule
columns: ``passes/group_spans.py``) is one ONNX ``If`` on ``skip[i]``, ``i`` its first block (a
0-d bool, as TensorRT's conditional layer requires; both branches return the same shapes and
dtypes).

The ONNX file carries, in ``metadata_props``, the input/output/state layout
(``fx_fastcache.spec``), the schedule (``fx_fastcache.schedule``) and the input the graph's clock
watches for a new generation (``fx_fastcache.stream_input``), so
:class:`fx_fastcache.export.runner.OnnxRunner` needs nothing else.

A fitted fallback's calibration (``A``, ``b`` of ``residual_linear``) is the given model's: a model
re-optimized for the export gets a copy of its fitted tensors before capture.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from fx_fastcache.passes.explicit_state import ExplicitStateSpec, explicit_state

from fx_fastcache.module import FastCacheModule, calibration_conflict
from fx_fastcache.policies.schedule import trim_table
from fx_fastcache.quiet import library_noise_silenced

from .onnx_fixes import drop_noop_squeezes, rewrite_bool_masked_fills
from .schedule import Schedule, apply_schedule, check_compatible, optimize_with_schedule, replay_config

logger = logging.getLogger(__name__)

MIN_OPSET = 18
#: The newest opset the exporter converts this graph to (torch 2.13's onnxscript: from 26 on it has no
#: Gelu adapter and no Attention op at the version it needs).
MAX_OPSET = 25
SPEC_KEY = "fx_fastcache.spec"
SCHEDULE_KEY = "fx_fastcache.schedule"
STREAM_KEY = "fx_fastcache.stream_input"


@dataclass
class OnnxExport:
    path: Path
    spec: ExplicitStateSpec
    schedule: Schedule
    opset: int
    n_if: int
    #: the input the graph's clock compares with the previous call's (rule 4 of
    #: :mod:`fx_fastcache.runtime.generation`); ``None``: it watches none
    stream_input: str | None = None


def _carry_calibration(src: FastCacheModule, opt: FastCacheModule) -> None:
    """Give ``opt`` (re-optimized from ``src.model``, not yet captured) the fitted tensors of ``src``.

    Why: ``opt`` starts with an empty store, so its fitted fallback would be the uncalibrated one
    (``A = 0, b = 0`` of ``residual_linear``) while ``src`` replays its fit: an export of ``opt`` would
    be silently wrong.  The tensors ``opt`` holds already (its schedule table) stay its own.
    """
    if not src.store.calibrated:
        return
    conflict = calibration_conflict(src.store.meta, opt.fastcache_config)
    if conflict is not None:
        raise ValueError(f"the model's calibration {conflict}; the schedule replays "
                         f"fallback={opt.fastcache_config.fallback!r}: calibrate the model with that fallback, or "
                         f"record the schedule with the model's fallback={src.fastcache_config.fallback!r}")
    for key, val in src.store.tensors.items():
        if key not in opt.store.tensors:
            opt.store.tensors[key] = val.detach().clone()
    opt.store.calibrated = True
    opt.store.meta.update(src.store.meta)


def stateless_module(model: nn.Module, schedule: Schedule, example_inputs: dict[str, Any]):
    """The stateless graph (and its spec) that :func:`export_onnx` exports; also usable in PyTorch.

    ``model`` is the original model, or one returned by ``optimize``: one that already replays
    ``schedule`` reuses its captured graph for these input shapes (its own graphs are not modified);
    another is re-optimized with the schedule and keeps its calibration (:func:`_carry_calibration`).
    """
    gm, spec, _ = _stateless(model, schedule, example_inputs)
    return gm, spec


def _stateless(model: nn.Module, schedule: Schedule, example_inputs: dict[str, Any]):
    """:func:`stateless_module` and the name of the input the graph's clock watches (``None``: none)."""
    if isinstance(model, FastCacheModule) and _replays(model, schedule):
        cfg = model.fastcache_config
        if cfg.enable_token_routing or cfg.enable_token_merge:
            raise ValueError("export supports block skipping only; optimize with enable_token_routing=False and "
                             "enable_token_merge=False")
        opt = model
    else:
        base = model.model if isinstance(model, FastCacheModule) else model
        opt = optimize_with_schedule(base, schedule, backend="eager", enable_token_routing=False,
                                     enable_token_merge=False)
        if isinstance(model, FastCacheModule):
            _carry_calibration(model, opt)
    entry = opt.capture(**example_inputs)
    gm, spec = explicit_state(entry.gm, entry.ctx)
    spec.dropped_squeezes = drop_noop_squeezes(gm)
    spec.rewritten_bool_fills = rewrite_bool_masked_fills(gm)
    return gm, spec, _clock_stream_input(entry, spec)


def _replays(model: FastCacheModule, schedule: Schedule) -> bool:
    """Whether ``model`` already replays ``schedule`` (its replay config and table), so its captured graph
    can be exported as it is.  Any other model is left alone and re-optimized: installing the schedule
    on it switched a caller's ``planned`` model to ``policy="schedule"`` (or another table), silently."""
    check_compatible(schedule, model.model, model.block_names())
    cfg = model.fastcache_config
    ignored = ("cache_ratio_threshold", "significance_level", "target_fraction")  # a table replay reads none
    if cfg != replay_config(schedule).replace(**{k: getattr(cfg, k) for k in ignored}):
        return False
    have = model.installed_schedule()
    return have is not None and torch.equal(have, trim_table(schedule.tensor()))


def _clock_stream_input(entry, spec: ExplicitStateSpec) -> str | None:
    """The model input the graph's clock compares with the previous call's (``None``: it watches none).

    Why: explicit_state removes the clock, so the runner applies the input-jump rule on the host
    and must feed it the same input as the clock.
    """
    clock = next(n for n in entry.gm.graph.nodes if n.op == "call_module" and n.target == entry.ctx.clock)
    x = clock.args[1] if len(clock.args) > 1 else None
    if x is None:
        return None
    if x.op != "placeholder" or x.name not in spec.inputs:
        raise RuntimeError(f"the graph's clock watches {x.name!r}, which is not one of the exported inputs "
                           f"{spec.inputs}; the runner could not apply the input-jump rule of a new generation")
    return x.name


def export_onnx(model: nn.Module, schedule: Schedule, example_inputs: dict[str, Any], path: str | Path,
                opset: int = MIN_OPSET) -> OnnxExport:
    """Export ``model`` with ``schedule`` to ``path`` (shapes fixed by ``example_inputs``)."""
    import onnx

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset={opset} is not supported: the export needs {MIN_OPSET} <= opset <= {MAX_OPSET}")
    gm, spec, stream_input = _stateless(model, schedule, example_inputs)
    gm.eval()
    complex_nodes = [n.name for n in gm.graph.nodes
                     if isinstance(v := n.meta.get("val"), torch.Tensor) and v.is_complex()]
    if complex_nodes:  # (the exporter failed deep inside with "No decompositions registered for complex")
        raise ValueError(f"{type(getattr(model, 'model', model)).__name__} computes with complex-valued tensors "
                         f"({', '.join(complex_nodes[:3])}: a rotary embedding such as Qwen-Image's); the exported "
                         f"graph's guarded blocks would carry them as operands of ONNX If nodes, which torch.onnx "
                         f"cannot convert (Qwen-Image's own ops fail without FastCache too); ONNX export is not "
                         f"available for this model")
    missing = [n for n in spec.inputs if n not in example_inputs]
    if missing:
        raise ValueError(f"example_inputs lack {missing}")
    args = tuple([example_inputs[n] for n in spec.inputs] + [schedule.row(0)] +
                 spec.initial_state(example_inputs[spec.inputs[0]].device))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    with library_noise_silenced():  # the exporter's "torchvision is not installed. Skipping ..." notices
        prog = torch.onnx.export(gm, args, dynamo=True, input_names=spec.input_names,
                                 output_names=spec.output_names, opset_version=opset, verbose=False)
    if prog is None:
        raise RuntimeError("torch.onnx.export returned nothing; the dynamo exporter (onnxscript) is required: "
                           "pip install onnxscript")
    for k, v in ((SPEC_KEY, json.dumps(spec.to_dict())), (SCHEDULE_KEY, schedule.to_json()),
                 (STREAM_KEY, json.dumps(stream_input))):
        prog.model.metadata_props[k] = v
    prog.save(str(path))
    try:
        onnx.checker.check_model(str(path))
    except Exception:
        path.unlink(missing_ok=True)  # no invalid file left behind
        raise
    m = onnx.load(str(path))
    n_if = sum(1 for n in m.graph.node if n.op_type == "If")
    got = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if n_if != len(spec.guarded):
        raise RuntimeError(f"exported graph has {n_if} If nodes for {len(spec.guarded)} guarded spans "
                           f"({len(spec.blocks)} blocks)")
    logger.info("exported %s: %d blocks in %d If, %d state tensors, opset %d", path, len(spec.blocks), n_if,
                len(spec.state), got)
    return OnnxExport(path, spec, schedule, got, n_if, stream_input)


def read_metadata(path: str | Path) -> tuple[ExplicitStateSpec, Schedule]:
    """The spec and schedule stored in an ONNX file written by :func:`export_onnx`."""
    spec, schedule, _ = _read_metadata(path)
    return spec, schedule


def read_runner_metadata(path: str | Path) -> tuple[ExplicitStateSpec, Schedule, str | None]:
    """:func:`read_metadata` and the input the graph's clock watches (``None``: it watches none).

    A file without it (exported by an older fx-fastcache) raises: a runner fed it could not tell
    fresh noise from the next step, and would carry stale state into a new generation.
    """
    spec, schedule, props = _read_metadata(path)
    if STREAM_KEY not in props:
        raise ValueError(f"{str(path)!r} has no {STREAM_KEY!r} metadata (the input the new-generation rule "
                         f"watches): it was exported by an older fx-fastcache; export the model again")
    try:
        stream_input = json.loads(props[STREAM_KEY])
    except json.JSONDecodeError:
        stream_input = 0  # damaged: refused below
    if stream_input is not None and not isinstance(stream_input, str):
        raise ValueError(f"{str(path)!r}: its {STREAM_KEY!r} metadata is damaged ({props[STREAM_KEY]!r}); "
                         f"export the model again")
    return spec, schedule, stream_input


def _read_metadata(path: str | Path) -> tuple[ExplicitStateSpec, Schedule, dict[str, str]]:
    import onnx

    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX file {str(path)!r} does not exist; write one with `fx-fastcache export-onnx`")
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises protobuf's DecodeError and others for a damaged file
        raise ValueError(f"{str(path)!r} is not a readable ONNX file ({type(e).__name__}: {e})") from None
    props = {p.key: p.value for p in m.metadata_props}
    missing = [k for k in (SPEC_KEY, SCHEDULE_KEY) if k not in props]
    if missing:
        raise ValueError(f"{str(path)!r} has no {missing} metadata: it was not written by "
                         f"`fx-fastcache export-onnx`")
    try:
        spec = ExplicitStateSpec.from_dict(json.loads(props[SPEC_KEY]))
        schedule_dict = json.loads(props[SCHEDULE_KEY])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{str(path)!r}: its fx-fastcache metadata is damaged ({type(e).__name__}: {e}); "
                         f"export the model again") from None
    return spec, Schedule.from_dict(schedule_dict, source=f"{path} metadata"), props


__all__ = ["export_onnx", "stateless_module", "read_metadata", "read_runner_metadata",
           "OnnxExport", "apply_schedule"]
