"""Search the planned steps on whole generations: the plan the images prefer, not the one the model of
the error prefers.

Why this exists.  ``policy="planned"`` chooses its computed steps with a dynamic program over the
forecast errors each skip makes *where it is made* (:func:`~fx_fastcache.policies.planned.plan`).
That model of the error misses how errors grow through the remaining steps, how they add up over
a run of forecasts, and what ``drift_correction`` repairs afterwards; on flux-mnist at 60 %
replaced its plan is 4 dB below a fixed interval (docs/BENCHMARKS.md).  Generations on calibration
inputs measure all of it.  This search (LeMiCa-style, but scored on the final outputs) starts from
the program's plan, from evenly spaced plans and from fixed-interval plans of the same budget (the
schedules TaylorSeer-style caches use: a warm-up, then one computed step every ``k``), keeps the
one whose calibration outputs score best against a full run (the mean PSNR, or the mean of the
worst quarter of the images), then moves one computed step at a time by one or two steps while
that improves the score.  Every plan it tries keeps the warm-up steps, the protected steps
(:func:`~fx_fastcache.policies.planned.protect_steps`) and the ``max_skip_steps`` cap.  One
generation per plan tried, at most ``max_runs`` per fraction.

This module holds the search itself (no store, no model); ``planned.search_plan`` runs it on the
calibrated plans and installs what it finds.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

#: How far the local search moves one computed step at a time.
MOVES = (-2, -1, 1, 2)
#: :func:`search_split` also searches the plans that compute this many first steps apart (step 0 and step 1).
SPLIT_STEPS = 2


def feasible(row: torch.Tensor, forced: int, protected: set[int], max_skip: int) -> bool:
    """``row`` (bool per step, True = computed) keeps the warm-up and protected steps and skips at most
    ``max_skip`` steps in a row (``0``: no cap)."""
    if not bool(row[:forced].all()) or any(not bool(row[k]) for k in protected):
        return False
    if max_skip > 0:
        run = 0
        for computed in row.tolist():
            run = 0 if computed else run + 1
            if run > max_skip:
                return False
    return True


def unique(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """``rows`` without repeats, first occurrences in order."""
    out: dict[tuple[bool, ...], torch.Tensor] = {}
    for r in rows:
        out.setdefault(tuple(r.tolist()), r)
    return list(out.values())


def spaced_plans(n: int, m: int, forced: int) -> list[torch.Tensor]:
    """Plans of ``m`` computed steps out of ``n``: the first ``w`` steps (``w`` from ``forced`` to
    ``forced + 3``), then the rest spread evenly over the remaining steps, from 0 to 3 steps later."""
    out: list[torch.Tensor] = []
    for w in range(forced, forced + 4):
        rest = m - w
        if rest < 0:
            continue
        for off in range(4):
            row = torch.zeros(n, dtype=torch.bool)
            row[:w] = True
            span = n - w - off
            if rest > 0 and span > 0:
                row[[min(n - 1, w + off + round(i * span / rest)) for i in range(rest)]] = True
            if int(row.sum()) == m:
                out.append(row)
    return unique(out)


def interval_plans(n: int, m: int, forced: int) -> list[torch.Tensor]:
    """Fixed-interval plans of exactly ``m`` computed steps out of ``n``: the first ``w`` steps (``w`` from
    ``forced`` to ``forced + 3``), then at least three steps ``w + o``, ``w + o + k``, ... (``o`` 0 or 1, an
    interval ``k >= 2``) up to the last ``k`` steps: TaylorSeer's ``disable_cache_before_step`` /
    ``cache_interval`` schedules, whose rounding the evenly spaced plans do not reproduce."""
    out: list[torch.Tensor] = []
    for w in range(forced, min(forced + 4, m - 2)):
        for k in range(2, n):
            for o in (0, 1):
                steps = list(range(w)) + list(range(w + o, n, k))
                if len(steps) != m or steps[-1] + k < n:  # the interval runs to the last step
                    continue
                row = torch.zeros(n, dtype=torch.bool)
                row[steps] = True
                out.append(row)
    return unique(out)


def start_plans(start: torch.Tensor, forced: int, protected: set[int], max_skip: int) -> list[torch.Tensor]:
    """The :func:`feasible` ones of ``start`` and the evenly spaced and fixed-interval plans of its budget
    (:func:`spaced_plans`, :func:`interval_plans`), without repeats: where :func:`search` starts."""
    n, m = len(start), int(start.sum())
    return unique([r for r in [start] + spaced_plans(n, m, forced) + interval_plans(n, m, forced)
                   if feasible(r, forced, protected, max_skip)])


def search(start: torch.Tensor, forced: int, protected: set[int], max_skip: int,
           score: Callable[[torch.Tensor], float], max_runs: int,
           scores: dict[tuple[bool, ...], float] | None = None) -> tuple[torch.Tensor, float, int]:
    """The best plan found from :func:`start_plans` (``start``: bool per step, True = computed), then by moving
    one computed step by :data:`MOVES` while ``score`` rises; every plan tried is :func:`feasible`.
    ``score(row)`` runs a generation: it is called at most ``max_runs`` times for distinct plans.
    ``scores`` (plan → score) may hold plans an earlier search scored: they are not generated again, and still
    count toward ``max_runs``.  Returns the plan, its score and how many generations it ran."""
    n = len(start)
    scores = {} if scores is None else scores
    before, asked = len(scores), set()

    def scored(row: torch.Tensor) -> float:
        key = tuple(row.tolist())
        asked.add(key)
        if key not in scores:
            scores[key] = score(row)
        return scores[key]

    cands = start_plans(start, forced, protected, max_skip)
    if not cands:
        raise ValueError(f"plan_search: no plan of {int(start.sum())} computed steps out of {n} keeps the first "
                         f"{forced} steps, the protected steps {sorted(protected)} and max_skip_steps={max_skip}")
    best = max(cands[:max_runs], key=scored)
    improved = True
    while improved and len(asked) < max_runs:
        improved = False
        for i in best.nonzero().flatten().tolist():
            for d in MOVES:
                j = i + d
                if i < forced or not 0 <= j < n or bool(best[j]) or len(asked) >= max_runs:
                    continue
                row = best.clone()
                row[i], row[j] = False, True
                if feasible(row, forced, protected, max_skip) and scored(row) > scored(best):
                    best, improved = row, True
                    break
            if improved:
                break
    return best, scored(best), len(scores) - before


def search_split(start: torch.Tensor, forced: int, protected: set[int], max_skip: int,
                 score: Callable[[torch.Tensor], float], max_runs: int) -> tuple[torch.Tensor, float, int]:
    """:func:`search` over the plans that keep the first ``forced`` steps and, where ``forced`` is below
    :data:`SPLIT_STEPS`, once more over those that compute the first :data:`SPLIT_STEPS` steps; the better
    (the first on ties).  At most ``max_runs`` plans per search; a plan both score is generated once.  Returns the
    plan, its score and how many generations both searches ran.

    Why: one hill climb ends in the local optimum of the family its best start plan belongs to.  With one
    warm-up step (plans may skip step 1) the search lifted the mean at 70 % replaced by 1.5-3.0 dB on four of five
    trained models, but on wan-mnist at 65 % it ended at 38.89 dB on the calibration images, below the 39.45 that
    the plans computing step 1 reach (docs/BENCHMARKS.md, "Thirty-ninth session").
    """
    scores: dict[tuple[bool, ...], float] = {}
    best, best_score, tried = search(start, forced, protected, max_skip, score, max_runs, scores)
    m = int(start.sum())
    if forced < SPLIT_STEPS <= m and start_plans(start, SPLIT_STEPS, protected, max_skip):
        other, other_score, more = search(start, SPLIT_STEPS, protected, max_skip, score, max_runs, scores)
        tried += more
        if other_score > best_score:
            best, best_score = other, other_score
    return best, best_score, tried
