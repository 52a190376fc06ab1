"""Precomputed skip schedules: record which blocks took the fallback at which step, and replay it.

Why: the statistical policies decide inside the graph from tensor values, which is what makes
them adaptive but also what ONNX/TensorRT cannot carry (no mutable state).  A schedule is the
decisions of calibration runs frozen into a ``steps × blocks`` boolean table (True = the block
is approximated at that step).  Replaying it (``policy="schedule"``) makes runs deterministic
and lets the exported graph take the current step's row as an input.

Recording reads each guard's ``skipped`` counter after every call of the optimized model (a
host read per call: fine while recording, never done in the hot path).  Several recorded
generations are merged per step and block: skipped where at least ``min_votes`` (half) of them
skipped.  Step 0 always computes every block (the fallbacks
have nothing cached yet), and a replay forces ``warmup_steps=0`` and ``max_skip_steps=0`` so
that the table alone decides.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import fx_fastcache as fastcache
from fx_fastcache.calibration import model_fingerprint
from fx_fastcache.config import FastCacheConfig
from fx_fastcache.families import block_modules, compute_dtype, resolve_family
from fx_fastcache.module import FastCacheModule
from fx_fastcache.pipelines import optimized_module
from fx_fastcache.policies import POLICIES
from fx_fastcache.policies.schedule import MAX_STEPS
from fx_fastcache.schedule_table import check_schedule_table
from fx_fastcache.trained import sample

logger = logging.getLogger(__name__)

FORMAT = "fx-fastcache/schedule/1"


@dataclass
class Schedule:
    """A ``steps × blocks`` skip table with what it was recorded on.

    Attributes:
        table: ``table[step][block]`` True = approximate that block at that step.
        blocks: block names (``transformer_blocks.3``) in execution order.
        fingerprint: :func:`fx_fastcache.calibration.model_fingerprint` of the model.
        config: the :class:`FastCacheConfig` fields the schedule was recorded with.
        model: the model name it was recorded on (informative).
        meta: free-form information (runs, sampler, steps ...).
    """

    table: list[list[bool]]
    blocks: list[str]
    fingerprint: str
    config: dict[str, Any]
    model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    #: where it was read from (``schedule file 'S.json'``), for error messages; not saved
    source: str = field(default="schedule", compare=False, repr=False)

    def __post_init__(self) -> None:
        # strict: 0/1, 0.3 or None in a table are errors, never coerced to booleans
        self.table = check_schedule_table(self.table, n_blocks=len(self.blocks), max_steps=MAX_STEPS).tolist()
        skipped0 = [b for b, v in zip(self.blocks, self.table[0]) if v]
        if skipped0:
            raise ValueError(f"schedule skips {skipped0} at step 0, before they ever computed (nothing cached to "
                             f"fall back on); step 0 must compute every block")

    @property
    def steps(self) -> int:
        return len(self.table)

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.table, dtype=torch.bool)

    def row(self, step: int) -> torch.Tensor:
        """The skip mask of ``step``; all False (compute everything) past the table's end."""
        if 0 <= step < self.steps:
            return torch.tensor(self.table[step], dtype=torch.bool)
        return torch.zeros(len(self.blocks), dtype=torch.bool)

    @property
    def skip_ratio(self) -> float:
        n = self.steps * len(self.blocks)
        return sum(map(sum, self.table)) / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "model": self.model, "fingerprint": self.fingerprint, "steps": self.steps,
                "blocks": self.blocks, "config": self.config, "table": self.table, "meta": self.meta}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "schedule") -> "Schedule":
        """Build a schedule from its JSON form; every error names ``source`` and what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"{source} holds a JSON {_json_kind(d)} at the top level; an fx-fastcache schedule is "
                             f"an object with format {FORMAT!r}, written by `fx-fastcache schedule`")
        if d.get("format") != FORMAT:
            raise ValueError(f"{source} is not an fx-fastcache schedule (format {d.get('format')!r}, "
                             f"expected {FORMAT!r}); write one with `fx-fastcache schedule`")
        missing = [k for k in ("table", "blocks", "fingerprint", "config", "steps") if k not in d]
        if missing:
            raise ValueError(f"{source} lacks the field(s) {missing}; write it with `fx-fastcache schedule`")
        blocks, steps, config = d["blocks"], d["steps"], d["config"]
        if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
            raise ValueError(f"{source}: 'blocks' must be a list of block names (strings), got {blocks!r}")
        if not isinstance(steps, int) or isinstance(steps, bool):
            raise ValueError(f"{source}: 'steps' must be an integer, got {steps!r}")
        if not isinstance(d["fingerprint"], str):
            raise ValueError(f"{source}: 'fingerprint' must be a string, got {d['fingerprint']!r}")
        if not isinstance(config, dict):
            raise ValueError(f"{source}: 'config' must be an object of FastCacheConfig fields, got {config!r}")
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{source}: 'meta' must be an object, got {meta!r}")
        fingerprints = meta.get("fingerprints", {})
        if not isinstance(fingerprints, dict) or not all(isinstance(v, str) for v in fingerprints.values()):
            raise ValueError(f"{source}: 'meta.fingerprints' must be an object of dtype -> fingerprint strings, "
                             f"got {fingerprints!r}")
        try:
            FastCacheConfig.from_dict(config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: 'config' is not a valid FastCacheConfig: {e}") from None
        try:
            check_schedule_table(d["table"], n_blocks=len(blocks), max_steps=MAX_STEPS, source=f"{source}: 'table'")
            s = cls(table=d["table"], blocks=list(blocks), fingerprint=d["fingerprint"], config=dict(config),
                    model=str(d.get("model", "")), meta=dict(meta), source=source)
        except TypeError as e:  # a wrong value in a file is a ValueError of that file
            raise ValueError(str(e)) from None
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith(source) else f"{source}: {msg}") from None
        if s.steps != steps:
            raise ValueError(f"{source}: 'steps' is {steps} but the table has {s.steps} rows")
        return s

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        """Read a schedule JSON file; a missing, unreadable or malformed file raises naming it."""
        p = Path(path)
        if p.is_dir():
            raise IsADirectoryError(f"schedule file {str(p)!r} is a folder; pass the JSON file written by "
                                    f"`fx-fastcache schedule --out FILE`")
        if not p.is_file():
            raise FileNotFoundError(f"schedule file {str(p)!r} does not exist; record one with "
                                    f"`fx-fastcache schedule --model NAME --out {p}`")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"schedule file {str(p)!r} is not UTF-8 text (a JSON file): {e}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"schedule file {str(p)!r} is not valid JSON: {e}") from None
        return cls.from_dict(d, source=f"schedule file {str(p)!r}")


def _json_kind(v: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _block_names(opt) -> list[str]:
    return opt.block_names()


def check_compatible(schedule: Schedule, model: nn.Module, block_names: list[str]) -> None:
    """Raise ``ValueError`` if ``schedule`` was recorded on another model or block layout."""
    if schedule.blocks != block_names:
        raise ValueError(f"{schedule.source} has blocks {schedule.blocks[:3]}... ({len(schedule.blocks)}) but "
                         f"{type(model).__name__} has {block_names[:3]}... ({len(block_names)}); "
                         f"record a schedule for this model")
    fp = model_fingerprint(model)
    if schedule.fingerprint == fp:
        return
    recorded, dtype = schedule.meta.get("dtype"), str(compute_dtype(model))
    if recorded is not None and recorded != dtype and _same_model_in_another_dtype(schedule, model, recorded, dtype):
        # a table of booleans does not depend on the dtype, but the weights' sums do: `fx-fastcache schedule`
        # records in float32, and the model runs in bfloat16
        logger.info("fx-fastcache: %s was recorded on this model in %s; it is %s now", schedule.source, recorded,
                    dtype)
        return
    raise ValueError(f"{schedule.source} was recorded on another model (fingerprint {schedule.fingerprint}, "
                     f"model {schedule.model!r}); this {type(model).__name__} has fingerprint {fp}. "
                     f"Record a schedule for this model with `fx-fastcache schedule`")


#: The dtypes a schedule keeps the model's fingerprint in, the model cast wholly to each (a cast rounds each
#: weight the same way every time, whether from float32 or from a model that kept some modules in float32).
REDUCED_DTYPES = (torch.bfloat16, torch.float16)


def _same_model_in_another_dtype(schedule: Schedule, model: nn.Module, recorded: str, dtype: str) -> bool:
    """Whether ``model`` is the model ``schedule`` was recorded on in another dtype: both cast wholly to the
    reduced dtype of the two have one fingerprint (diffusers' ``from_pretrained(torch_dtype=bfloat16)`` keeps
    some modules in float32, so the model as loaded matches no plain cast)."""
    stored = schedule.meta.get("fingerprints", {})
    return any(str(d) in (recorded, dtype) and stored.get(str(d)) == model_fingerprint(model, as_dtype=d)
               for d in REDUCED_DTYPES)


def identity_meta(model: nn.Module) -> dict[str, Any]:
    """What a schedule keeps of the model besides its fingerprint: its dtype and its fingerprint cast wholly
    to each reduced dtype (so that it replays on the same model in another dtype)."""
    return {"dtype": str(compute_dtype(model)),
            "fingerprints": {str(d): model_fingerprint(model, as_dtype=d) for d in REDUCED_DTYPES}}


def replay_config(schedule: Schedule):
    """The config a replay uses: the recorded one with ``policy="schedule"`` and no warm-up or skip cap."""
    config = FastCacheConfig.from_dict(schedule.config)
    if config.output_rule != "none":  # (a replay has no plan to fit it for, and export carries no rule state)
        raise ValueError(f"output_rule={config.output_rule!r} is not supported by export or schedule replay (its "
                         f"state is not carried as explicit inputs); optimize with output_rule='none' to export")
    return config.replace(policy="schedule", warmup_steps=0, max_skip_steps=0)


def optimize_with_schedule(model: nn.Module, schedule: Schedule, backend: str = "eager", blocks: Any = None,
                           **overrides: Any):
    """``optimize(model)`` whose decisions come from ``schedule`` (checked against the model).  ``blocks``: the
    block lists, as ``optimize`` takes them; by default the family's, or for a model of none the lists the
    schedule's blocks belong to (it was recorded on ``optimize(model, blocks=[...])``: the lookup failed); a
    ``BlockListSpec`` the recording used (stream names) is not in the schedule: pass it as ``blocks=``."""
    if blocks is None:
        try:
            resolve_family(model)
        except ValueError:
            blocks = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in schedule.blocks))
    spec = resolve_family(model, blocks)
    check_compatible(schedule, model, [n for n, _, _ in block_modules(model, spec)])
    opt = fastcache.optimize(model, backend=backend, blocks=blocks,
                             config=replay_config(schedule).replace(**overrides))
    fastcache.set_schedule(opt, schedule.tensor())
    return opt


def _optimized(opt, caller: str) -> FastCacheModule:
    """``opt`` itself, or the optimized transformer of a pipeline (one: Wan 2.2's two experts are named
    in the error); anything else is a ``TypeError``."""
    return optimized_module(opt, caller)


def installed_schedule(opt, model_name: str = "", steps: int | None = None) -> Schedule:
    """The table ``opt`` replays, as a :class:`Schedule` to save or export: the one set with
    ``fastcache.set_schedule`` (``policy="schedule"``) or planned by calibration
    (``policy="planned"``, for its current ``target_fraction``).  ``steps`` pads the table with
    computed steps to the generation length (default: up to its last skipped step)."""
    opt = _optimized(opt, "installed_schedule")
    table = opt.installed_schedule() if POLICIES[opt.fastcache_config.policy].host_decidable else None
    if table is None:
        raise ValueError(f"this model (policy={opt.fastcache_config.policy!r}) replays no table: use policy='schedule' "
                         f"with fastcache.set_schedule, or calibrate policy='planned'; record_schedule records one "
                         f"from a deciding policy")
    if steps is not None:
        if steps < table.shape[0]:
            raise ValueError(f"steps={steps} is shorter than the installed table ({table.shape[0]} steps)")
        table = torch.cat([table, torch.zeros(steps - table.shape[0], table.shape[1], dtype=torch.bool)])
    meta = {"policy": opt.fastcache_config.policy, **identity_meta(opt.model)}
    return Schedule(table=table.tolist(), blocks=_block_names(opt), fingerprint=model_fingerprint(opt.model),
                    config=opt.fastcache_config.to_dict(), model=model_name, meta=meta)


def apply_schedule(opt, schedule: Schedule) -> None:
    """Install ``schedule`` on an optimized model (switching it to ``policy="schedule"``)."""
    check_compatible(schedule, opt.model, _block_names(opt))
    cfg = replay_config(schedule)
    changes = {k: v for k, v in cfg.to_dict().items() if getattr(opt.fastcache_config, k) != v}
    if changes:
        fastcache.configure(opt, **changes)
    fastcache.set_schedule(opt, schedule.tensor())


class _StepRecorder:
    """Forward hook on the optimized model: after each call, which blocks were approximated."""

    def __init__(self, opt, n_blocks: int) -> None:
        self.opt = opt
        self.n_blocks = n_blocks
        self.prev: dict[int, list[float]] = {}
        #: per generation, per cache context (CFG as two calls per step: "cond", "uncond"), step -> row.
        #: (One table per generation let the uncond call overwrite the cond call's row, and its step 0
        #: opened another generation.)
        self.runs: list[dict[Any, dict[int, list[bool]]]] = []
        #: per cache context: ``opt.restarts()`` last seen, and the step of the generation at which its
        #: graph's clock started again (a shape change in the middle: cfg_truncation), and the last step
        self.restarts: dict[Any, int] = {}
        self.offset: dict[Any, int] = {}
        self.last_step: dict[Any, int] = {}

    def __call__(self, module, args, kwargs, output) -> None:
        if self.opt.last_call_uncached:  # the model itself ran (SD3's skip-layer calls): no graph, no decisions
            return
        entry = self.opt.last_entry()
        context = self.opt.active_context
        step, restarts = int(entry.clock.step), self.opt.restarts()
        if restarts != self.restarts.setdefault(context, restarts):  # the generation goes on after a restart
            self.restarts[context] = restarts
            self.offset[context] = self.last_step.get(context, -1) + 1 - step
        elif step == 0:
            self.offset[context] = 0
        step += self.offset.get(context, 0)
        self.last_step[context] = step
        now = [float(g.skipped) for g in entry.guards for _ in g.blocks]  # a guarded span: per block
        prev = self.prev.get(id(entry), [0.0] * len(now))
        self.prev[id(entry)] = now
        row = [b > a for a, b in zip(prev, now)]
        if not self.runs or (step == 0 and self.runs[-1].get(context)):
            self.runs.append({})
        self.runs[-1].setdefault(context, {})[step] = row

    def records(self) -> list[dict[int, list[bool]]]:
        """Every recorded (generation, cache context): each one votes."""
        return [rows for run in self.runs for rows in run.values() if rows]


def record_schedule(opt, run: Callable[[], Any], generations: int = 1, model_name: str = "",
                    min_votes: float = 0.5, meta: dict[str, Any] | None = None) -> Schedule:
    """Record a schedule from ``generations`` calls of ``run()`` (each one sampling loop of ``opt``).

    ``opt`` is an optimized model (eager is fine) with its statistical policy; every call of
    ``run`` must run one whole generation.  A block is skipped at a step in the schedule when
    at least ``min_votes`` of the recorded generations skipped it there (with CFG as two calls per
    step, each cache context of a generation votes).
    """
    opt = _optimized(opt, "record_schedule")
    if POLICIES[opt.fastcache_config.policy].host_decidable:
        raise ValueError("record_schedule needs a deciding policy (e.g. policy='step_forecast'); this model replays "
                         "a schedule already")
    names = _block_names(opt)
    rec = _StepRecorder(opt, len(names))
    handle = opt.register_forward_hook(rec, with_kwargs=True)
    try:
        for _ in range(generations):
            opt.reset()
            rec.prev.clear()
            rec.runs.append({})
            run()
    finally:
        handle.remove()
    runs = [r for r in rec.runs if any(r.values())]
    records = rec.records()
    if not records:
        raise RuntimeError("run() made no call of the optimized model; nothing was recorded")
    steps = max(max(r) for r in records) + 1
    table = []
    for s in range(steps):
        votes = [r[s] for r in records if s in r]
        row = [sum(v[j] for v in votes) >= min_votes * len(votes) and len(votes) > 0 for j in range(len(names))]
        table.append(row if s > 0 else [False] * len(names))
    sched = Schedule(table=table, blocks=names, fingerprint=model_fingerprint(opt.model), config=opt.fastcache_config.to_dict(),
                     model=model_name, meta={"generations": len(runs), **identity_meta(opt.model), **(meta or {})})
    logger.info("recorded schedule: %d steps x %d blocks, %.1f%% skipped", sched.steps, len(names),
                100 * sched.skip_ratio)
    return sched


def record_for_model(resolved, steps: int = 20, generations: int = 2, batch: int = 4, config=None,
                     calibration: str | Path | None = None, progress: bool = False, **overrides: Any) -> Schedule:
    """Record a schedule for a :class:`fx_fastcache.cli.common.ResolvedModel`.

    Trained models sample with their own Euler sampler (``fx_fastcache.trained.sample``, CFG
    batch of ``2 * batch``); tiny random models run their inputs over ``steps`` timesteps
    from 1000 down to 0.  ``progress`` shows a tqdm bar (stderr) over the recorded model calls.
    """
    if not 1 <= steps <= MAX_STEPS:  # fail before recording, not after minutes of sampling
        raise ValueError(f"steps={steps}: a schedule holds 1 to {MAX_STEPS} steps")
    opt = fastcache.optimize(resolved.model, backend="eager", config=config, **overrides)
    if calibration is not None:
        fastcache.load_calibration(opt, calibration)
    from tqdm.auto import tqdm

    bar = tqdm(total=generations * steps, desc="recording schedule", unit="step", disable=not progress)
    hook = opt.register_forward_hook(lambda *_: bar.update(1))
    gen = {"i": 0}
    if resolved.trained is not None:
        def run() -> None:
            k = gen["i"]
            gen["i"] += 1
            classes = [(k * batch + j) % 10 for j in range(batch)]
            sample(resolved.trained, classes, seeds=[1000 * k + j for j in range(batch)], steps=steps, model=opt)

        meta = {"sampler": "fx_fastcache.trained.sample (Euler, cfg=2.0)", "batch": 2 * batch, "steps": steps}
    else:
        ts = torch.linspace(1000.0, 0.0, steps + 1)[:-1].tolist()

        def run() -> None:
            for t in ts:
                opt(**resolved.make_inputs(t, batch))

        meta = {"sampler": "timesteps linspace(1000, 0)", "batch": batch, "steps": steps, "timesteps": ts}
    try:
        with torch.no_grad():  # inference only: grad mode would make the optimized model warn
            return record_schedule(opt, run, generations=generations, model_name=resolved.name, meta=meta)
    finally:
        hook.remove()
        bar.close()
