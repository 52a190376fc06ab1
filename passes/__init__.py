"""The FX pass pipeline: an explicit ordered list, one pass per file.

Each pass is ``pass_fn(gm, ctx) -> None``, mutates ``gm`` in place and leaves it linted.
:func:`run_pipeline` recompiles ``gm`` once, after the last pass (a recompile per pass cost 5-15 % of
a capture), and records, for every pass, the node names it added and removed and, with ``record``,
the graph code before and after (the graph-diff tool reads these).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch.fx as fx

from .apply_output_rule import apply_output_rule
from .cleanup import cleanup
from .context import BlockRegion, PassContext, PassResult
from .correct_drift import correct_drift
from .find_block_args import find_block_args
from .find_blocks import find_blocks
from .forecast_noise import forecast_noise
from .group_spans import group_spans
from .guard_blocks import guard_blocks
from .hoist_probes import hoist_probes
from .merge_tokens import merge_tokens
from .pin_cond_operands import pin_cond_operands
from .route_tokens import route_tokens
from .strip_markers import strip_markers

logger = logging.getLogger(__name__)

PassFn = Callable[[fx.GraphModule, PassContext], None]

PIPELINE: list[tuple[str, PassFn]] = [
    ("find_blocks", find_blocks),
    ("find_block_args", find_block_args),
    ("strip_markers", strip_markers),
    ("hoist_probes", hoist_probes),
    ("group_spans", group_spans),
    ("guard_blocks", guard_blocks),
    ("route_tokens", route_tokens),
    ("merge_tokens", merge_tokens),
    ("forecast_noise", forecast_noise),
    ("correct_drift", correct_drift),
    ("apply_output_rule", apply_output_rule),
    ("pin_cond_operands", pin_cond_operands),
    ("cleanup", cleanup),
]


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, record: bool = False) -> list[PassResult]:
    results: list[PassResult] = []
    for name, fn in PIPELINE:
        before = {n.name for n in gm.graph.nodes}
        n_before = len(before)
        code_before = _code(gm) if record else ""
        fn(gm, ctx)
        after = {n.name for n in gm.graph.nodes}
        res = PassResult(name, n_before, len(after), sorted(after - before), sorted(before - after),
                         code_before, _code(gm) if record else "")
        logger.debug("%s: %d → %d nodes (+%d, -%d)", name, n_before, len(after), len(res.added), len(res.removed))
        results.append(res)
    gm.recompile()
    return results


def _code(gm: fx.GraphModule) -> str:
    """The graph's code as it is now (passes leave recompiling to :func:`run_pipeline`)."""
    gm.recompile()
    return gm.code


__all__ = ["PIPELINE", "PassContext", "PassResult", "BlockRegion", "run_pipeline"]
