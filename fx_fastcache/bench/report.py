"""Writing a sweep's results: JSON, a Markdown table and the speed-quality frontier plot.

The plot has two panels with PSNR (mean over the evaluation images) on y: against the
fraction of block evaluations replaced, and against the measured wall-clock speedup.  Dashed
lines show the targets (40 dB at 60 %, 35 dB at 70 %); worst-image PSNR is drawn as faint
markers under each method's mean so a fragile seed stays visible.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fx_fastcache.policies import POLICIES

logger = logging.getLogger(__name__)

__all__ = ["write_json", "markdown_table", "write_markdown", "plot_frontier", "pareto", "write_all", "merge",
           "family", "fraction_table"]


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_clean(result), indent=1, sort_keys=False))


def _f(x: Any, fmt: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return format(x, fmt)


def _shift(setup: dict[str, Any]) -> str:
    """`` (schedule shift 3)`` for a shifted sampler; nothing for the uniform one (and results written before
    the option)."""
    shift = setup.get("shift", 1.0)
    return "" if shift == 1 else f" (schedule shift {shift:g})"


def markdown_table(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"Model `{s['model']}`, {s['n_images']} images (seeds {s['eval_seeds'][0]}–{s['eval_seeds'][1]}), "
        f"{s['steps']} steps{_shift(s)}, CFG {s['cfg']}, calibration seeds {s['calib_seeds'][0]}–{s['calib_seeds'][1]}, "
        f"backend {s['backend']}, {s['threads']} threads, torch {s['torch']}. Uncached: class accuracy "
        f"{_f(s['uncached_class_accuracy'], '.2f')}, Fréchet distance {_f(s['uncached_frechet'], '.2f')}. Timing: "
        f"{s['timing_images']} images, uncached and cached interleaved, best of {s['timing_repeats']}.",
        "",
        "| method | thr | replaced | FLOPs saved | PSNR mean (worst) | SSIM mean (worst) | class acc | Fréchet "
        "| s/img uncached | s/img cached | speedup | ideal | speedup/ideal | state KiB/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['method']} | {_f(r.get('threshold'), '.3g')} | {_f(100 * r['replaced_fraction'], '.1f')}% "
            f"| {_f(100 * r['flops_saved'], '.1f')}% | {_f(r['psnr_mean'], '.2f')} ({_f(r['psnr_worst'], '.2f')}) "
            f"| {_f(r['ssim_mean'], '.4f')} ({_f(r['ssim_worst'], '.4f')}) | {_f(r['class_accuracy'], '.2f')} "
            f"| {_f(r['frechet'], '.2f')} | {_f(r.get('time_per_image_uncached_s'), '.3f')} "
            f"| {_f(r.get('time_per_image_s'), '.3f')} | {_f(r.get('speedup'), '.2f')}× "
            f"| {_f(r.get('ideal_speedup'), '.2f')}× | {_f(r.get('speedup_vs_ideal'), '.2f')} "
            f"| {_state_kib(r)} |")
    return "\n".join(lines) + "\n"


def _state_kib(r: dict[str, Any]) -> str:
    """Peer hook state per image (CFG: 2 batch rows per image), KiB; '—' where not measured."""
    if r.get("state_bytes") is None or not r.get("state_batch_rows"):
        return "—"
    return format(r["state_bytes"] / (r["state_batch_rows"] / 2) / 1024, ".0f")


def write_markdown(result: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(markdown_table(result))


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper-right frontier of (fraction, quality) points, by increasing fraction."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not out or y > out[-1][1]:
            out.append((x, y))
    return sorted(out)


def plot_frontier(result: dict[str, Any], path: str | Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r["kind"] != "none"]
    methods: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        methods.setdefault(r["method"], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>pX*h"
    for k, (name, rs) in enumerate(methods.items()):
        rs = sorted(rs, key=lambda r: r["replaced_fraction"])
        c, mk = cmap((2 * k) % 20 if k < 10 else (2 * k + 1) % 20), markers[k % len(markers)]
        peer = rs[0]["kind"] not in ("fastcache", "none")
        ls = ":" if peer else "-"
        x = [100 * r["replaced_fraction"] for r in rs]
        y = [min(r["psnr_mean"], 60.0) for r in rs]
        yw = [min(r["psnr_worst"], 60.0) for r in rs]
        axes[0].plot(x, y, ls, marker=mk, color=c, label=name, lw=2.2 if k == 0 else 1.2)
        axes[0].scatter(x, yw, marker=mk, color=c, alpha=0.25, s=18)
        timed = [r for r in rs if r.get("speedup")]
        if timed:
            # markers only: single timing pairs on a shared machine are noisy, lines would zigzag
            axes[1].scatter([r["speedup"] for r in timed], [min(r["psnr_mean"], 60.0) for r in timed], marker=mk,
                            color=c, label=name)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylabel("PSNR vs uncached, dB (mean; faint: worst image)")
    axes[0].set_xlabel("block evaluations replaced, %")
    axes[1].set_xlabel("measured wall-clock speedup vs uncached (×), timed runs only")
    if axes[1].get_legend_handles_labels()[0]:  # nothing timed (--timing-images 0): no legend to draw
        axes[1].legend(fontsize=7, loc="lower left")
    else:
        axes[1].text(0.5, 0.5, "not timed", transform=axes[1].transAxes, ha="center", color="gray")
    axes[0].plot([60, 60], [40, 60], "k--", lw=0.8)
    axes[0].plot([70, 70], [35, 60], "k--", lw=0.8)
    axes[0].annotate("targets", (60, 40), textcoords="offset points", xytext=(4, -12), fontsize=8)
    axes[0].legend(fontsize=7, loc="lower left")
    s = result["setup"]
    fig.suptitle(title or f"{s['model']}: {s['n_images']} images, {s['steps']} steps{_shift(s)}, CFG {s['cfg']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: dict[str, Any], out_dir: str | Path, stem: str) -> dict[str, Path]:
    """Write ``{stem}.json``, ``{stem}.md`` and ``{stem}.png`` into ``out_dir``."""
    out = Path(out_dir)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    write_json(result, paths["json"])
    write_markdown(result, paths["md"])
    plot_frontier(result, paths["png"])
    return paths


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several sweeps of the same model and settings (e.g. run in parallel).

    The setup comes from the first complete result; runs are concatenated in order, duplicate
    ``none`` runs are dropped, and so is a run identical to one already taken (a result merged
    into a file that already holds it).  Partial results (``setup.partial``) contribute runs.
    """
    full = [r for r in results if not r["setup"].get("partial")]
    if not full:
        raise ValueError("merge() needs at least one complete result (with its setup)")
    setup = dict(full[0]["setup"])
    keys = ("model", "n_images", "steps", "cfg", "eval_seeds", "calib_seeds")
    for r in full[1:]:
        diff = [k for k in keys if r["setup"].get(k) != setup.get(k)]
        if r["setup"].get("shift", 1.0) != setup.get("shift", 1.0):  # results before the option: uniform
            diff.append("shift")
        if diff:
            raise ValueError(f"cannot merge sweeps with different {diff}: {[r['setup'].get(k) for k in diff]} vs "
                             f"{[setup.get(k) for k in diff]}")
    for r in results:
        if r["setup"].get("model") != setup["model"]:
            raise ValueError(f"cannot merge results of {r['setup'].get('model')!r} into {setup['model']!r}")
    runs: list[dict[str, Any]] = []
    seen_none = False
    taken: set[str] = set()
    for r in results:
        for run in r["runs"]:
            if run["kind"] == "none":
                if seen_none:
                    continue
                seen_none = True
            key = json.dumps(run, sort_keys=True, default=str)
            if key in taken:
                continue
            taken.add(key)
            runs.append(run)
    setup["merged_from"] = len(results)
    return {"setup": setup, "runs": runs}


def search_column(run: dict[str, Any]) -> str:
    """``" + search"`` for a run whose plans ``search_plan`` chose, naming an objective other than the mean."""
    if not run.get("searched_plan"):
        return ""
    objective = run.get("search_objective") or "mean"
    return " + search" + ("" if objective == "mean" else f" ({objective})")


def family(run: dict[str, Any]) -> str:
    """The column a run belongs to in :func:`fraction_table`: a peer (all its settings together) or
    our ``policy/fallback`` (all warm-up / cap variants together)."""
    names = {"diffusers_fbc": "diffusers FBC", "cache_dit": "cache-dit DBCache",
             "diffusers_taylorseer": "diffusers TaylorSeer", "diffusers_magcache": "diffusers MagCache"}
    if run["kind"] in names:
        return names[run["kind"]]
    if run["kind"] == "fastcache":
        if POLICIES[run["policy"]].peer_fallback is not None:
            return run["policy"]
        return f"ours {run['policy']}+{run['fallback']}" + (" (sensitivity)" if run.get("sensitivity") else "") + (
            f" (protect {run['protect_db']:g} dB)" if run.get("protect_db") else "") + (
            " + drift" if run.get("drift_correction") else "") + (
            " + noise" if run.get("noise_forecast") else "") + search_column(run) + (
            " + fitted rule" if run.get("output_rule_fit") else "")
    return run["kind"]


def _setting(run: dict[str, Any]) -> str:
    if run["kind"] == "diffusers_taylorseer":
        o = run.get("options", {})
        return f"o{o.get('order', 1):g} b{o.get('before', 3):g} i{run['threshold']:g}"
    if run["kind"] == "diffusers_magcache":
        o = run.get("options", {})
        return f"K{o.get('max_skip', 3):g} r{o.get('retention', 0.2):g} {run['threshold']:g}"
    extra = f" m{run['max_skip_steps']}" if run.get("max_skip_steps") else ""
    if run.get("warmup_steps") not in (None, 2, 0):
        extra += f" w{run['warmup_steps']}"
    policy = POLICIES.get(run.get("policy"))
    cal = "cal " if policy is not None and policy.scope == "step" and policy.needs_calibration \
        and policy.peer_fallback is None and run.get("calibration_s") else ""  # our calibrated step rule
    return f"{cal}{run['threshold']:g}{extra}"


def fraction_table(result: dict[str, Any], fractions=(0.45, 0.5, 0.55, 0.6, 0.65, 0.7), tol: float = 0.025,
                   settings: bool = True, families: list[str] | None = None) -> str:
    """Markdown: per fraction replaced (±``tol``), each family's best run by mean PSNR, as
    ``mean (worst)`` with its setting; the best mean of the row in bold.  ``families``: the
    columns to show, in order (default: every family, in order of appearance).  Settings:
    ``cal`` = step_forecast threshold on the calibrated scale; ``o/b/i`` = TaylorSeer order,
    ``disable_cache_before_step``, interval; ``K/r`` = MagCache ``max_skip_steps``, retention."""
    runs = [r for r in result["runs"] if r["kind"] != "none"]
    fams = families or list(dict.fromkeys(family(r) for r in runs))
    runs = [r for r in runs if family(r) in fams]
    lines = ["| replaced | " + " | ".join(fams) + " |", "|---" * (len(fams) + 1) + "|"]
    for f in fractions:
        cells, best = [], None
        picks = {}
        for fam in fams:
            rs = [r for r in runs if family(r) == fam and abs(r["replaced_fraction"] - f) <= tol + 1e-9]
            if rs:
                picks[fam] = max(rs, key=lambda r: r["psnr_mean"])
                best = max(best or -1e9, picks[fam]["psnr_mean"])
        if not picks:
            continue
        for fam in fams:
            r = picks.get(fam)
            if r is None:
                cells.append("—")
                continue
            txt = f"{r['psnr_mean']:.1f} ({r['psnr_worst']:.1f})"
            if r["psnr_mean"] == best:
                txt = f"**{txt}**"
            if settings:
                txt += f" [{100 * r['replaced_fraction']:.0f}%, {_setting(r)}]"
            cells.append(txt)
        lines.append(f"| {100 * f:.0f} % | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
