"""Other things to do at a skipped step, emulated on the model's output outside the library: anchor the
forecast on the predicted clean image, or compute the conditional row of classifier-free guidance only.

Why it exists: at 70 % replaced (6 of 20 steps computed) the worst image is far below the 28 dB target
on every model (docs/BENCHMARKS.md, "Thirteenth session").  Two ideas change what a skipped step hands
the sampler rather than which steps compute; this measures them before any library work:

* the rule for a skipped step, per CFG row (``--rules``): ``lin`` extrapolates the velocity linearly in
  σ through the last two computed steps (the ``forecast`` fallback's rule, applied to the output);
  ``x0c`` keeps the last computed prediction of the clean image ``x0 = x − σ v`` and steers the current
  latent to it, ``v = (x − x0) / σ``; ``x0l`` extrapolates ``x0`` linearly in σ instead; ``mix`` is the
  mean of ``lin`` and ``x0l``; ``epsc`` / ``epsl`` keep (or extrapolate linearly in σ) the predicted noise
  ``ε = x + (1 − σ) v`` instead, ``v = (ε − x) / (1 − σ)``; ``epsm`` is the mean of ``lin`` and ``epsl``, ``epsw`` their
  blend with weight ``1 − σ`` on ``epsl`` (the noise-anchored velocity divides by ``1 − σ``); ``dhold`` / ``dhalf`` extrapolate the two rows' mean linearly and keep the
  guidance difference ``c − u`` of the last computed step (``dhold``) or half its linear extrapolation
  (``dhalf``): the guidance scale amplifies an error in the difference, not in the mean;
* CFG-split plans (FasterCache's CFG cache): besides ``F`` (both rows computed) and ``S`` (none), a step
  may be ``C``: the conditional row computed, the unconditional one forecast (``--uncond lin``) or taken
  as the new conditional output minus the guidance difference of the last full step (``--uncond diff``).
  A ``C`` step costs half a step, so ``FFSCSCSCSCSCSCSCSCSS`` replaces as much as six whole steps of 20.

Images are the benchmark's 16 evaluation images (seeds 1000–1015, classes ``i % 10``, 20 Euler steps,
guidance 2), compared with the uncached images::

    python benchmarks/output_forecasts.py --model dit-mnist --rules lin,x0c --plans FFSFSSFSSSFSSSSFSSSS

``--drift β`` adds the library's flow-Euler drift correction (:mod:`fx_fastcache.runtime.drift`) to each
row's output, at that row's computed steps (the conditional row computes at ``F`` and ``C`` steps, the
unconditional one at ``F`` steps).  ``--uncond diffh`` is ``diff`` whose unconditional value also joins
that row's forecast history.  ``--search PLAN`` starts from ``PLAN`` and moves one letter at a time (an
``F`` or ``C`` to another step, an ``F`` split into two ``C``, two ``C`` joined into an ``F``) while the
mean PSNR on 16 calibration images (seeds 0–15) rises, at no more cost; ``--whole-only`` keeps to ``F``
and ``S``, for the same search over whole steps; the search uses the first of ``--rules``.  It then reports both plans on the evaluation images::

    python benchmarks/output_forecasts.py --model flux-mnist --drift 4 --uncond diffh --search FFSFSSSFSSSFSSSSFSSS

``--errors`` prints, per image, the rule's relative error against the computed velocity at each computed step
(what a per-image detector during the generation could read), worst image first, with each step's correlation of
that error with the final PSNR.

``--guidance`` prints, the same way, each image's guidance difference relative to the unconditional output,
``‖c − u‖ / ‖u‖``, at each computed step (how strongly the class pulls: the other signal a detector could read), and
both tables end with each step's AUC for the images below ``--bar`` dB: the chance that such an image has the larger
value (1 or 0: a signal that separates them, 0.5: one that does not).  ``--first-seeds`` scores other sets of 16
images (seeds ``N`` … ``N + 15`` each, classes ``i % 10``) and pools them in every report, so a signal can be judged
on more than the 16 evaluation images::

    python benchmarks/output_forecasts.py --model pixart-mnist --drift 2 --errors --guidance \
        --first-seeds 1000 0 16 100 116 132 148 --plans FFSFSSFSSSFSSSSFSSSS

``--per-image`` also gives what a perfect detector would be worth: the images below ``--bar`` on the first plan take
their best of the other plans (which may compute more steps; the fraction replaced counts what each image spent)::

    python benchmarks/output_forecasts.py --model pixart-mnist --drift 2 --per-image \
        --first-seeds 1000 0 16 100 116 132 148 --plans FFSFSSFSSSFSSSSFSSSS FFFFSSFSSSFSSSSFSSSS FFSFFSFSSSFSSSSFSSSS

``--signals STEP`` screens cheap per-image values a detector could read at the first plan's computed steps before
``STEP`` (norms, changes and shares of the predicted clean image, the rows' agreement: :func:`trajectory_signals`),
printing each one's AUC, farthest from chance first.

``--classes`` asks whether something known before the first step marks the images below ``--bar``: for each plan, those
images with their classes and each class's mean (worst), and for the first plan the AUC of statistics of each image's
initial noise (:func:`noise_statistics`), over all images and over each half of them (the first half of the seeds in
``--first-seeds`` order, and the rest), so a value that only looks apart by chance disagrees between the halves::

    python benchmarks/output_forecasts.py --model pixart-mnist --drift 2 --classes \
        --first-seeds 0 16 32 100 116 132 148 1000 --plans FFSFSSFSSSFSSSSFSSSS FFFSFSSFSSSSSFSSSSSS

``--random-plans N`` adds N plans of whole steps drawn at random (``--sample-seed``) from those that compute steps 0
and 1 and ``--computed`` − 2 more, the first of them by step 5 and each 2–8 steps after the last (828 plans at 6
computed steps): the plausible ones.  ``--per-image`` then asks what choosing the plan *per image* could give,
an oracle no detector can beat: each image's best PSNR over every plan scored, and the images' best among the K
plans with the highest mean (K = 1, 2, 3, 5, 10), so a per-image choice among a few good plans::

    python benchmarks/output_forecasts.py --model pixart-mnist --drift 2 --random-plans 150 --per-image \
        --plans FFSFSSFSSSFSSSSFSSSS
"""
from __future__ import annotations

import argparse
import itertools
import random

import torch

from fx_fastcache.bench.metrics import psnr
from fx_fastcache.trained import _initial_noise, load_trained, sample

CFG_RULES = {"dhold": 0.0, "dhalf": 0.5}  # the guidance difference's share of its linear extrapolation
RULES = ("lin", "x0c", "x0l", "mix", "epsc", "epsl", "epsm", "epsw", *CFG_RULES)
UNCOND = ("lin", "diff", "diffh")
STEPS = 20
SET_CLASSES = [i % 10 for i in range(16)]  # the classes of each set of 16 seeds (--first-seeds)


class Drift:
    """The library's drift correction (:class:`fx_fastcache.runtime.drift.DriftCorrection`) for one row's
    output, on the host: ``__call__(computed, σ, v)`` returns the velocity handed to the sampler."""

    def __init__(self, damping: float) -> None:
        self.damping = damping
        self.v_c = self.v_last = None
        self.acc, self.w_sum, self.u_sum, self.t_c, self.t_last, self.last_skipped = 0, 0.0, 0.0, 0.0, 0.0, False

    def __call__(self, computed: bool, t: float, v: torch.Tensor) -> torch.Tensor:
        t = float(t)
        w = (t - self.t_last) / t if self.last_skipped and t != 0 else 0.0  # the previous forecast step's weight
        acc = self.acc + w * self.v_last if w else self.acc
        w_sum, u_sum = self.w_sum + w, self.u_sum + w * (self.t_last - self.t_c)
        out = v
        dt, gap = t - self.t_last, t - self.t_c
        if computed and w_sum != 0 and dt != 0 and gap != 0:
            u = u_sum / gap
            out = v + (t + dt) / dt * (self.v_c * w_sum + (v - self.v_c) * u - acc) / (1 - self.damping * u)
        if computed:
            self.v_c, self.t_c, self.acc, self.w_sum, self.u_sum = v, t, 0, 0.0, 0.0
        else:
            self.acc, self.w_sum, self.u_sum = acc, w_sum, u_sum
        self.v_last, self.t_last, self.last_skipped = v, t, not computed
        return out


def _value(h: dict, key: str) -> torch.Tensor:
    """``v``, or what a computed step predicts from it: the clean image ``x0 = x − σ v``, the noise
    ``eps = x + (1 − σ) v``."""
    if key == "x0":
        return h["x"] - h["s"] * h["v"]
    if key == "eps":
        return h["x"] + (1 - h["s"]) * h["v"]
    return h[key]


def _extrapolate(hist: list[dict], s: torch.Tensor, key: str) -> torch.Tensor:
    """``key`` linear in σ through the last two computed steps (the last one if there is one)."""
    if len(hist) == 1:
        return _value(hist[-1], key)
    a, b = hist[-2], hist[-1]
    return _value(b, key) + (s - b["s"]) / (b["s"] - a["s"]) * (_value(b, key) - _value(a, key))


def _skip(hist: list[dict], s: torch.Tensor, x: torch.Tensor, rule: str) -> torch.Tensor:
    """The velocity of one CFG row at a skipped step, by ``rule``."""
    v = _extrapolate(hist, s, "v")
    if rule == "lin":
        return v
    if rule in ("epsc", "epsl", "epsm", "epsw"):  # the predicted noise eps = x + (1 - σ) v, held or linear in σ
        eps = _value(hist[-1], "eps") if rule == "epsc" else _extrapolate(hist, s, "eps")
        w = {"epsm": 0.5, "epsw": 1 - s}.get(rule, 1.0)  # the share of the noise-anchored velocity
        return w * (eps - x) / (1 - s) + (1 - w) * v
    x0 = _value(hist[-1], "x0") if rule == "x0c" else _extrapolate(hist, s, "x0")
    vx = (x - x0) / s
    return vx if rule in ("x0c", "x0l") else 0.5 * (v + vx)


class PlannedRows:
    """Stands in for the model in :func:`fx_fastcache.trained.sample` (batch ``[cond, uncond]``): computes
    the rows ``plan`` says at each call and hands the sampler the rule's velocity for the others.  With
    ``errors``, ``self.errors[i]`` is each image's relative error of the rule's guided velocity (guidance
    ``cfg``) against the computed one at each ``F`` step ``i`` after the first: what a detector could read, and
    ``self.guidance_ratio[i]`` each image's ``‖c − u‖ / ‖u‖`` at each ``F`` step ``i``, and ``self.seen[i]`` what
    the step saw, ``(σ, x, c, u)`` (the conditional row's latent and both rows' outputs)."""

    def __init__(self, model, plan: str, rule: str, uncond: str, drift: float | None = None,
                 errors: bool = False, cfg: float = 2.0) -> None:
        self.model, self.plan, self.rule, self.uncond = model, plan, rule, uncond
        self.errors: dict[int, torch.Tensor] | None = {} if errors else None
        self.seen: dict[int, tuple] | None = {} if errors else None
        self.cfg = cfg
        self.sig = torch.linspace(1.0, 0.0, len(plan) + 1)  # the sampler's default schedule
        self.i = 0
        self.hc: list[dict] = []  # computed steps of each row: {"s", "v", "x"}
        self.hu: list[dict] = []
        self.drift = None if drift is None else (Drift(drift), Drift(drift))

    def __call__(self, **kw):
        letter, s = self.plan[self.i], self.sig[self.i]
        self.i += 1
        x = kw["hidden_states"]
        b = len(x) // 2
        if letter == "F":
            c, u = self.model(**kw)[0].chunk(2)
            if self.seen is not None:
                self.seen[self.i - 1] = (s, x[:b], c, u)
            if self.errors is not None and self.hc:
                fc, fu = self._forecast(s, x, b)
                g, fg = u + self.cfg * (c - u), fu + self.cfg * (fc - fu)
                self.errors[self.i - 1] = (fg - g).flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)
        elif letter == "C":  # the conditional half of every batched argument
            c = self.model(**{k: v[:b] if isinstance(v, torch.Tensor) and v.ndim and len(v) == 2 * b else v
                              for k, v in kw.items()})[0]
            if self.uncond == "lin":
                u = _skip(self.hu, s, x[b:], "lin")
            else:  # the guidance difference of the last full step
                u = c - self.guidance
        else:
            c, u = self._forecast(s, x, b)
        if letter == "F":
            self.guidance = c - u
        if letter in "FC":
            self.hc.append({"s": s, "v": c, "x": x[:b]})
        if letter == "F" or (letter == "C" and self.uncond == "diffh"):
            self.hu.append({"s": s, "v": u, "x": x[b:]})
        if self.drift is not None:
            c, u = self.drift[0](letter in "FC", s, c), self.drift[1](letter == "F", s, u)
        return (torch.cat([c, u]),)

    @property
    def guidance_ratio(self) -> dict[int, torch.Tensor] | None:
        """``‖c − u‖ / ‖u‖`` per image at each computed step, from what the steps saw."""
        if self.seen is None:
            return None
        return {k: (c - u).flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1) for k, (_, _, c, u) in self.seen.items()}

    def _forecast(self, s: torch.Tensor, x: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two rows' velocities the rule hands the sampler at a skipped step."""
        if self.rule in CFG_RULES:
            c, u = _skip(self.hc, s, x[:b], "lin"), _skip(self.hu, s, x[b:], "lin")
            m, d_lin = 0.5 * (c + u), c - u
            d_last = self.hc[-1]["v"] - self.hu[-1]["v"]
            d = d_last + CFG_RULES[self.rule] * (d_lin - d_last)
            return m + 0.5 * d, m - 0.5 * d
        return _skip(self.hc, s, x[:b], self.rule), _skip(self.hu, s, x[b:], self.rule)


def cost(plan: str) -> float:
    """Whole steps' worth of compute: ``F`` 1, ``C`` ½."""
    return plan.count("F") + 0.5 * plan.count("C")


def neighbours(plan: str, whole_only: bool) -> list[str]:
    """Plans one move from ``plan`` at no more cost; steps 0 and 1 stay as they are."""
    out, p = set(), list(plan)
    free = [j for j in range(2, len(p)) if p[j] == "S"]
    for i in range(2, len(p)):
        for j in free:
            if p[i] in "FC":  # move it
                out.add("".join(q if k not in (i, j) else ("S" if k == i else p[i]) for k, q in enumerate(p)))
            if p[i] == "F" and not whole_only:  # split it
                out.add("".join("C" if k in (i, j) else q for k, q in enumerate(p)))
        if p[i] == "C":  # join two
            for j in range(2, len(p)):
                if j != i and p[j] == "C":
                    out.add("".join("F" if k == i else "S" if k == j else q for k, q in enumerate(p)))
    return sorted(q for q in out if cost(q) <= cost(plan) and q != plan)


def random_plans(count: int, computed: int, seed: int) -> list[str]:
    """``count`` plans of whole steps drawn without replacement (Python's ``random``, ``seed``) from those that
    compute steps 0 and 1 and ``computed`` − 2 more, the first of them by step 5 and each 2–8 steps after the
    last, as ``F``/``S`` letters.  Refuses more than there are."""
    pool = [p for p in itertools.combinations(range(2, STEPS), computed - 2)
            if p and p[0] <= 5 and all(2 <= b - a <= 8 for a, b in zip(p, p[1:]))]
    if not 0 < count <= len(pool):
        raise ValueError(f"--random-plans {count}: between 1 and the {len(pool)} plausible plans of {computed} "
                         f"computed steps")
    picked = sorted(random.Random(seed).sample(pool, count))
    return ["".join("F" if i in (0, 1, *p) else "S" for i in range(STEPS)) for p in picked]


def per_image_oracle(q: torch.Tensor, ks: tuple[int, ...] = (1, 2, 3, 5, 10)) -> list[tuple[int, float, float]]:
    """``q``: PSNR per plan (rows) and image (columns).  For each K, the mean and worst of the images' best PSNR
    among the K plans with the highest mean (K capped at the plans there are, each K once)."""
    top = q.mean(1).argsort(descending=True)
    out = []
    for k in sorted({min(k, len(q)) for k in ks}):
        best = q[top[:k]].max(0).values
        out.append((k, float(best.mean()), float(best.min())))
    return out


def rescue_oracle(q: torch.Tensor, costs: list[float], bar: float) -> tuple[float, float, float]:
    """A perfect detector's worth: the images below ``bar`` dB on the first plan (row 0 of ``q``) take their best
    PSNR over the other plans, the rest keep the first.  Returns the mean and worst PSNR and the percentage
    replaced, each rescued image costing its best plan's ``costs`` (steps computed of ``STEPS``)."""
    low = q[0] < bar
    best = q[1:].max(0)
    got = torch.where(low, best.values, q[0])
    spent = torch.where(low, torch.tensor(costs[1:])[best.indices], torch.tensor(costs[0]))
    return float(got.mean()), float(got.min()), 100 * (1 - float(spent.mean()) / STEPS)


def error_table(errors: dict[int, torch.Tensor], q: torch.Tensor, seeds: list[int], name: str = "error") -> str:
    """``--errors``: per image (worst PSNR first), the rule's relative error at each computed step, then each
    step's correlation of error with PSNR across the images and the rank of the worst image's error there
    (1: the largest): a detector of the image that breaks needs a large error on it, i.e. rank 1.  ``name`` names
    the value in those lines (``--guidance`` prints its ratio the same way)."""
    steps = sorted(errors)
    e = torch.stack([errors[k] for k in steps], 1)
    lines = ["  seed   PSNR  " + " ".join(f"{f'step {k}':>8}" for k in steps)]
    lines += [f"  {seeds[i]} {q[i]:6.2f}  " + " ".join(f"{v:8.3f}" for v in e[i].tolist())
              for i in q.argsort().tolist()]
    worst = int(q.argmin())
    corr = [float(torch.corrcoef(torch.stack([e[:, n], q]))[0, 1]) for n in range(len(steps))]
    rank = [int((e[:, n] > e[worst, n]).sum()) + 1 for n in range(len(steps))]
    lines.append(f"  corr({name}, PSNR) " + " ".join(f"{c:+.2f}" for c in corr)
                 + f"; the worst image's {name} ranks " + " ".join(map(str, rank)) + f" of {len(q)}")
    return "\n".join(lines)


def trajectory_signals(seen: dict[int, tuple], before: int, cfg: float = 2.0) -> dict[str, torch.Tensor]:
    """``--signals``: cheap per-image values a detector could read at the computed steps before ``before`` (from
    ``PlannedRows.seen``), with the guided output ``g = u + cfg (c − u)`` and its clean image ``x0 = x − σ g``: at each
    step ``x0``'s norm, its share of positive pixels (``ink``), the rows' cosine and ``max |c − u| / max |u|``
    (``gdmax``); between each two steps the relative change of ``x0`` (``dx0``), of its largest pixel change
    (``dx0max``) and of ``g`` (``dg``)."""
    flat = lambda t: t.flatten(1)  # noqa: E731
    norm = lambda t: flat(t).norm(dim=1)  # noqa: E731
    steps = sorted(k for k in seen if k < before)
    g, x0 = {}, {}
    out = {}
    for k in steps:
        s, x, c, u = seen[k]
        g[k] = u + cfg * (c - u)
        x0[k] = x - s * g[k]
        out[f"x0 norm {k}"] = norm(x0[k])
        out[f"x0 ink {k}"] = (flat(x0[k]) > 0).double().mean(1)
        out[f"cos(c,u) {k}"] = torch.nn.functional.cosine_similarity(flat(c), flat(u))
        out[f"gdmax {k}"] = flat(c - u).abs().max(1).values / flat(u).abs().max(1).values
    for k0, k1 in itertools.combinations(steps, 2):
        d = x0[k1] - x0[k0]
        out[f"dx0 {k0}-{k1}"] = norm(d) / norm(x0[k1])
        out[f"dx0max {k0}-{k1}"] = flat(d).abs().max(1).values / flat(x0[k1]).abs().max(1).values
        out[f"dg {k0}-{k1}"] = norm(g[k1] - g[k0]) / norm(g[k1])
    return out


def noise_statistics(noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """``--classes``: per image, statistics of the initial noise ``(B, C, H, W)``, known before the first step: its
    norm, mean, the norm of its central half (rows and columns), and the norm and largest magnitude of its 2-, 4-, 8-
    and 16-pixel averages (the low frequencies the early steps settle; those wider than the image are left out)."""
    h = noise.shape[-1]
    flat = noise.flatten(1)
    out = {"norm": flat.norm(dim=1), "mean": flat.mean(1),
           "center norm": noise[..., h // 4:h - h // 4, h // 4:h - h // 4].flatten(1).norm(dim=1)}
    for k in (2, 4, 8, 16):
        if k <= min(noise.shape[-2:]):
            avg = torch.nn.functional.avg_pool2d(noise, k).flatten(1)
            out[f"avg{k} norm"], out[f"avg{k} max"] = avg.norm(dim=1), avg.abs().max(1).values
    return out


def class_report(q: torch.Tensor, seeds: list[int], classes: list[int], bar: float) -> str:
    """``--classes``: the images below ``bar`` dB with their classes, and each class's mean (worst)."""
    low = [(s, c, v) for s, c, v in zip(seeds, classes, q.tolist()) if v < bar]
    per: dict[int, list[float]] = {}
    for c, v in zip(classes, q.tolist()):
        per.setdefault(c, []).append(v)
    return (f"  {len(low)} of {len(q)} images below {bar:g} dB, in {len({c for _, c, _ in low})} of {len(per)} "
            f"classes: " + (", ".join(f"{s} (class {c}) {v:.1f}" for s, c, v in low) or "none") + "\n"
            + "  per class, mean (worst): "
            + ", ".join(f"{c}: {sum(v) / len(v):.1f} ({min(v):.1f})" for c, v in sorted(per.items())))


def noise_report(stats: dict[str, torch.Tensor], q: torch.Tensor, bar: float) -> str:
    """``--classes``: each noise statistic's AUC for the images below ``bar`` dB, over all images and over each
    half of them, farthest from chance first."""
    low = q < bar
    if low.all() or not low.any():
        return f"  noise: every image is on one side of {bar:g} dB, so there is nothing to detect"
    n = len(q) // 2

    def part(v: torch.Tensor, sl: slice) -> str:
        return f"{auc(v[sl], q[sl], bar):.2f}" if 0 < int(low[sl].sum()) < len(q[sl]) else "-"

    ranked = sorted(stats.items(), key=lambda kv: -abs(auc(kv[1], q, bar) - 0.5))
    return (f"  {len(stats)} statistics of the initial noise, AUC for the {int(low.sum())} of {len(q)} images below "
            f"{bar:g} dB (1: larger there), all, first half, second half ({int(low[:n].sum())} and "
            f"{int(low[n:].sum())} below):\n"
            + "\n".join(f"    {k:12s} {auc(v, q, bar):.2f}  {part(v, slice(0, n))} {part(v, slice(n, None))}"
                        for k, v in ranked))


def auc(values: torch.Tensor, q: torch.Tensor, bar: float) -> float:
    """The chance that an image below ``bar`` dB has a larger value than one at or above it (ties count half)."""
    low = q < bar
    d = values[low][:, None] - values[~low][None]
    return float((d > 0).double().mean() + 0.5 * (d == 0).double().mean())


def auc_line(values: dict[int, torch.Tensor], q: torch.Tensor, bar: float) -> str:
    """Per step, the chance that an image below ``bar`` dB has a larger value than one at or above it (ties count
    half): the area under the ROC curve of the value as a detector of those images."""
    low = q < bar
    if low.all() or not low.any():
        return f"  AUC: every image is on one side of {bar:g} dB"
    out = [f"step {k} {auc(values[k], q, bar):.2f}" for k in sorted(values)]
    return f"  AUC for the {int(low.sum())} of {len(q)} images below {bar:g} dB (1: larger there): " + ", ".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dit-mnist")
    ap.add_argument("--rules", default="lin", help=f"comma-separated, of {', '.join(RULES)}")
    ap.add_argument("--uncond", default="lin", choices=UNCOND, help="the unconditional row at a C step")
    ap.add_argument("--plans", nargs="+", default=[], help=f"one letter (F, S, C) per step, {STEPS} steps")
    ap.add_argument("--drift", type=float, default=None, help="add the drift correction with this damping β")
    ap.add_argument("--search", default=None, metavar="PLAN", help="search from PLAN on calibration seeds 0-15")
    ap.add_argument("--whole-only", action="store_true", help="--search over F and S only")
    ap.add_argument("--random-plans", type=int, default=0, metavar="N", help="add N plausible plans of whole steps")
    ap.add_argument("--computed", type=int, default=6, help="--random-plans: computed steps per plan (6: 70 %%)")
    ap.add_argument("--sample-seed", type=int, default=0, help="--random-plans: the draw's seed")
    ap.add_argument("--errors", action="store_true",
                    help="per image, the rule's relative error at each computed step (the first rule), by PSNR")
    ap.add_argument("--guidance", action="store_true",
                    help="per image, ||c - u|| / ||u|| at each computed step (the first rule), by PSNR")
    ap.add_argument("--signals", type=int, default=None, metavar="STEP",
                    help="AUC of cheap per-image signals at the computed steps before STEP (the first rule)")
    ap.add_argument("--bar", type=float, default=28.0,
                    help="--errors/--guidance/--signals/--classes: the PSNR bar (dB) of the images to detect; "
                         "--per-image: the images to rescue")
    ap.add_argument("--first-seeds", type=int, nargs="+", default=[1000], metavar="N",
                    help="score the images of seeds N..N+15 for each N, pooled (default: the evaluation images 1000)")
    ap.add_argument("--per-image", action="store_true",
                    help="report each image's best over the plans (the first rule): a per-image oracle")
    ap.add_argument("--classes", action="store_true",
                    help="per plan (the first rule), the images below --bar with their classes; for the first plan, "
                         "the AUC of statistics of the initial noise for them")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    rules = a.rules.split(",")
    for r in rules:
        if r not in RULES:
            ap.error(f"--rules: {r!r} is not one of {', '.join(RULES)}")
    for p in a.plans + ([a.search] if a.search else []):
        if len(p) != STEPS or set(p) - set("FSC") or p[0] != "F":
            ap.error(f"plan {p!r} must be {STEPS} letters of F, S, C starting with F")
    if a.random_plans:
        if a.computed < 3:
            ap.error(f"--computed {a.computed}: at least 3 (steps 0 and 1 and one more)")
        try:
            a.plans = a.plans + [p for p in random_plans(a.random_plans, a.computed, a.sample_seed) if p not in a.plans]
        except ValueError as e:
            ap.error(str(e))
    if a.signals is not None and a.signals < 1:
        ap.error(f"--signals {a.signals}: the values are read at the computed steps before STEP; give 1 or more "
                 f"(4: steps 0, 1 and 3 of the 70 % plan)")
    starts = sorted(a.first_seeds)
    if starts[0] < 0 or any(b - s < 16 for s, b in zip(starts, starts[1:])):
        ap.error(f"--first-seeds {' '.join(map(str, a.first_seeds))}: each set is the 16 seeds from N; give "
                 f"starts of at least 0, each at least 16 from the others")
    if a.search and starts[0] < 16:
        ap.error(f"--first-seeds {starts[0]} with --search: the search scores seeds 0-15; start the sets at 16 "
                 f"or later")
    if not a.plans and not a.search:
        ap.error("give --plans, --random-plans or --search")
    if a.classes and not a.plans:
        ap.error("--classes reports on the plans given: give --plans or --random-plans (--search's plans are not "
                 "reported by class)")
    if a.per_image and len(a.plans) < 2:
        ap.error("--per-image compares plans: give at least two (--plans, --random-plans)")
    torch.set_num_threads(a.threads)
    tm = load_trained(a.model)
    images = {}

    def score(plan: str, first_seed: int, rule: str = "lin", errors: dict | None = None,
              guidance: dict | None = None, signals: dict | None = None) -> torch.Tensor:
        if first_seed not in images:
            seeds = list(range(first_seed, first_seed + 16))
            images[first_seed] = (SET_CLASSES, seeds, sample(tm, SET_CLASSES, seeds, steps=STEPS))
        classes, seeds, ref = images[first_seed]
        rows = PlannedRows(tm.model, plan, rule, a.uncond, a.drift,
                           errors=any(d is not None for d in (errors, guidance, signals)))
        q = psnr(sample(tm, classes, seeds, steps=STEPS, model=rows), ref)
        found = trajectory_signals(rows.seen, a.signals) if signals is not None else None
        for pooled, got in ((errors, rows.errors), (guidance, rows.guidance_ratio), (signals, found)):
            if pooled is not None:
                for k, v in got.items():
                    pooled[k] = torch.cat([pooled[k], v]) if k in pooled else v
        return q

    def scored_sets(plan: str, rule: str, errors: dict | None = None, guidance: dict | None = None,
                    signals: dict | None = None) -> torch.Tensor:
        """``plan`` on every set of ``--first-seeds``, PSNR per image in that order."""
        return torch.cat([score(plan, s, rule, errors, guidance, signals) for s in a.first_seeds])

    def line(plan: str, q: torch.Tensor, what: str) -> str:
        return (f"{a.model} {plan} {what} uncond={a.uncond} drift={a.drift}: {100 * (1 - cost(plan) / STEPS):.1f} % "
                f"replaced, {q.mean():.2f} ({q.min():.2f}) dB")

    seeds = [n + i for n in a.first_seeds for i in range(16)]  # score()'s sets, in the order scored_sets pools them
    classes = SET_CLASSES * len(a.first_seeds)  # in the same order
    scored = []
    for p in a.plans:
        for r in rules:
            first = r == rules[0]  # the reports read the first rule's run; each pools only what was asked for
            errs = {} if first and a.errors else None
            guid = {} if first and a.guidance else None
            sigs = {} if first and a.signals is not None else None
            q = scored_sets(p, r, errs, guid, sigs)
            print(line(p, q, f"rule={r}"), flush=True)
            for what, name, table in (("errors", "error", errs), ("guidance", "guidance", guid)):
                if table is not None:
                    print(f"  {what}:\n" + error_table(table, q, seeds, name) + "\n" + auc_line(table, q, a.bar),
                          flush=True)
            if sigs is not None:
                below = int((q < a.bar).sum())
                if not 0 < below < len(q):
                    print(f"  signals: every image is on one side of {a.bar:g} dB, so there is nothing to detect",
                          flush=True)
                else:
                    ranked = sorted(((auc(v, q, a.bar), k) for k, v in sigs.items()), key=lambda t: -abs(t[0] - 0.5))
                    print(f"  {len(ranked)} signals before step {a.signals}, AUC for the {below} of {len(q)} images "
                          f"below {a.bar:g} dB (1: larger there), farthest from 0.5 first:\n"
                          + "\n".join(f"    {k:16s} {v:.2f}" for v, k in ranked), flush=True)
            if first and a.classes:
                print(class_report(q, seeds, classes, a.bar), flush=True)
                if not scored:
                    noise = _initial_noise(seeds, (tm.in_channels, tm.sample_size, tm.sample_size), tm.device, tm.dtype)
                    print(noise_report(noise_statistics(noise), q, a.bar), flush=True)
            if first:
                scored.append(q)
    if a.per_image:
        q = torch.stack(scored)
        print(f"each image's best over {len(q)} plans (rule={rules[0]}): "
              + ", ".join(f"{s} {v:.1f}" for s, v in zip(seeds, q.max(0).values.tolist())))
        for k, mean, worst in per_image_oracle(q):
            print(f"  the best per image among the {k} best plans by mean: {mean:.2f} ({worst:.2f}) dB", flush=True)
        mean, worst, replaced = rescue_oracle(q, [cost(p) for p in a.plans], a.bar)
        print(f"  the images below {a.bar:g} dB on the first plan given their best of the others (a perfect "
              f"detector): {mean:.2f} ({worst:.2f}) dB, {replaced:.1f} % replaced", flush=True)
    if a.search:
        best, seen = a.search, {}

        def mean(plan: str) -> float:
            if plan not in seen:
                seen[plan] = float(score(plan, 0, rules[0]).mean())
            return seen[plan]

        while True:
            cand = max(neighbours(best, a.whole_only), key=mean, default=None)
            if cand is None or mean(cand) <= mean(best):
                break
            best = cand
            print(f"  calibration {mean(best):.2f} dB: {best}", flush=True)
        for p, what in ((a.search, "start"), (best, f"searched ({len(seen)} plans tried)")):
            print(line(p, scored_sets(p, rules[0]), f"rule={rules[0]} {what}"), flush=True)


if __name__ == "__main__":
    main()
