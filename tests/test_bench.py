"""The benchmark: method parsing, bad input, result merging, and a smoke run of the CLI
(2 steps, 2 images) that writes JSON, Markdown and the frontier plot."""
from __future__ import annotations

import json
import logging
import warnings

import pytest

from fx_fastcache.bench import parse_method, pareto, run_benchmark
from fx_fastcache.bench.report import family, merge, plot_frontier


@pytest.mark.parametrize("spec,policy,fallback,warmup,max_skip", [
    ("step_forecast/forecast", "step_forecast", "forecast", 2, 0),
    ("chi2/residual_linear:warmup=3", "chi2", "residual_linear", 3, 0),
    ("step_forecast/forecast:warmup=1:max_skip=2", "step_forecast", "forecast", 1, 2),
    ("first_block_cache", "first_block_cache", "residual", 0, 0),
    ("teacache", "teacache", "residual", 0, 0),
], ids=["default", "chi2-warmup", "options", "fbc", "teacache"])
def test_parse_method(spec, policy, fallback, warmup, max_skip):
    m = parse_method(spec)
    assert (m.kind, m.policy, m.fallback, m.warmup_steps, m.max_skip_steps) == ("fastcache", policy, fallback, warmup,
                                                                                max_skip)
    assert m.thresholds
    assert parse_method(spec, [0.5]).thresholds == (0.5,)


def test_parse_planned_with_sensitivity():
    m = parse_method("planned/forecast:sens=1")
    assert (m.policy, m.sensitivity, m.thresholds) == ("planned", True, (0.45, 0.55, 0.6, 0.65, 0.7))
    assert "sensitivity" in m.name and not parse_method("planned/forecast").sensitivity


def test_parse_planned_with_protected_steps():
    m = parse_method("planned/forecast:protect=34")
    assert (m.policy, m.protect, m.sensitivity) == ("planned", 34.0, False)
    assert "protect 34 dB" in m.name and parse_method("planned/forecast").protect is None
    assert parse_method("planned/forecast:protect=30.5").protect == 30.5


def test_parse_drift_correction():
    m = parse_method("planned/forecast:drift=1:protect=34")
    assert (m.policy, m.drift, m.protect) == ("planned", True, 34.0)
    assert "(drift)" in m.name and not parse_method("planned/forecast").drift


def test_parse_search():
    m = parse_method("planned/forecast:drift=1:search=1", [0.5, 0.6])
    assert (m.policy, m.drift, m.search, m.thresholds) == ("planned", True, "mean", (0.5, 0.6))
    assert "(searched)" in m.name and not parse_method("planned/forecast").search
    w = parse_method("planned/forecast:search=worst_quarter:search_images=32", [0.7])
    assert (w.search, w.search_images) == ("worst_quarter", 32) and "(searched worst_quarter, 32 images)" in w.name
    run = {"kind": "fastcache", "policy": "planned", "fallback": "forecast", "drift_correction": True}
    assert family(run) == "ours planned+forecast + drift"  # the searched runs get a column of their own
    assert family(dict(run, searched_plan=[0, 1, 3])) == "ours planned+forecast + drift + search"
    assert family(dict(run, searched_plan=[0, 1, 3], search_objective="worst_quarter")) == (
        "ours planned+forecast + drift + search (worst_quarter)")


def test_methods_help_names_every_form_and_option():
    """``fx-fastcache bench --help`` listed five forms and two options of the dozen it parses."""
    from fx_fastcache.bench.runner import PEER_OPTIONS, PEERS, methods_help

    text = methods_help()
    for head in ("none", "first_block_cache", "teacache", "POLICY/FALLBACK", *PEERS):
        assert head in text, head
    for key in ("warmup", "max_skip", "drift", "noise", "search", "search_images", "sens", "protect"):
        assert f":{key}=" in text, key
        parse_method(f"planned/forecast:{key}={32 if key in ('protect', 'search_images') else 1}:search=1")
    for peer, opts in PEER_OPTIONS.items():
        for key, default in opts.items():
            assert f"[:{key}=" in text, (peer, key)
            assert parse_method(f"{peer}:{key}={default}").kind == peer


def test_parse_peers_and_none():
    assert parse_method("none").kind == "none"
    assert parse_method("diffusers_fbc").kind == "diffusers_fbc"


@pytest.mark.parametrize("spec,words", [
    ("step_forecast/nope", ["step_forecast/nope", "FALLBACK"]),
    ("magic", ["magic", "POLICY"]),
    ("step_forecast/forecast:speed=2", ["speed=2", "warmup"]),
    ("planned/forecast:protect=high", ["protect=high", "PSNR floor"]),
    ("planned/forecast:drift=yes", ["drift=yes", "drift correction"]),
    ("planned/forecast:search=2", ["search=2", "search_plan"]),
    ("planned/forecast:search=1:search_images=1", ["search_images=1", "N >= 2"]),
    ("planned/forecast:search_images=32", ["search_images=N", "add ':search=1'"]),
    ("diffusers_fbc:warmup=2", ["only to FastCache"]),
    # found by running a sweep: these failed at the method's turn, or ran with other settings than recorded
    ("diffusers_magcache:max_skip=1.5", ["'max_skip' takes an integer", "'1.5'"]),
    ("diffusers_magcache:retention=inf", ["'retention' takes a fraction in [0, 1]", "'inf'"]),
    ("diffusers_taylorseer:order=nan", ["'order' takes an integer", "'nan'"]),
    ("diffusers_magcache:max_skip=inf", ["'max_skip' takes an integer", "'inf'"]),
    ("none:warmup=3", ["takes no options"]),
    ("step_forecast/forecast:protect=34", ["':protect' re-plans", "planned/forecast:protect=DB"]),
    ("chi2/forecast:drift=1", ["at threshold", "drift_correction"]),
], ids=["bad-fallback", "bad-name", "bad-option", "bad-protect", "bad-drift", "bad-search", "bad-search-images",
        "search-images-alone", "peer-option", "fractional-count", "inf-fraction", "nan-order", "inf-count", "none-options",
        "protect-not-planned", "drift-per-block"])
def test_parse_method_errors_name_the_value(spec, words):
    with pytest.raises(ValueError) as e:
        parse_method(spec)
    assert all(w in str(e.value) for w in words)


def test_overlapping_calibration_seeds_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        run_benchmark("dit-mnist", ["none"], n_images=4, eval_seed=10, calib_seed=12)


def test_pareto_keeps_the_upper_frontier():
    pts = [(0.2, 40.0), (0.5, 35.0), (0.5, 30.0), (0.6, 36.0), (0.7, 20.0)]
    assert pareto(pts) == [(0.2, 40.0), (0.6, 36.0), (0.7, 20.0)]


def test_untimed_plot_draws_without_warnings(tmp_path):
    """A run with --timing-images 0 has no speedup to plot: the plot says so instead of warning."""
    pytest.importorskip("matplotlib")
    run = {"kind": "fastcache", "method": "fastcache[planned/forecast]", "replaced_fraction": 0.5,
           "psnr_mean": 40.0, "psnr_worst": 30.0}
    res = {"setup": {"model": "dit-mnist", "n_images": 2, "steps": 20, "cfg": 2.0}, "runs": [run]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_frontier(res, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_merge_refuses_different_settings():
    a = {"setup": {"model": "dit-mnist", "n_images": 16, "steps": 20, "cfg": 2.0, "eval_seeds": [0, 1],
                   "calib_seeds": [5, 6]}, "runs": [{"kind": "none"}, {"kind": "fastcache", "threshold": 0.1}]}
    b = json.loads(json.dumps(a))
    b["runs"][1]["threshold"] = 0.2
    merged = merge([a, b])
    assert [r["kind"] for r in merged["runs"]] == ["none", "fastcache", "fastcache"]  # one reference only
    # a result merged into a file that already holds it adds nothing
    assert merge([merged, a])["runs"] == merged["runs"]
    b["setup"]["steps"] = 10
    with pytest.raises(ValueError, match="steps"):
        merge([a, b])
    b["setup"].update(steps=20, shift=3.0)  # a result without the key ran the uniform schedule
    with pytest.raises(ValueError, match="shift"):
        merge([a, b])
    b["setup"]["shift"] = 1.0
    assert len(merge([a, b])["runs"]) == 3


def test_shifted_sigmas_are_the_pipelines_schedule():
    import torch

    from fx_fastcache.trained import shifted_sigmas

    assert torch.equal(shifted_sigmas(4, 1.0), torch.linspace(1.0, 0.0, 5))
    s = shifted_sigmas(4, 3.0)  # u = 1, .75, .5, .25, 0 -> 3u / (1 + 2u)
    torch.testing.assert_close(s, torch.tensor([1.0, 2.25 / 2.5, 0.75, 0.75 / 1.5, 0.0]))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"shift={bad!r}: expected a finite number > 0"):
            shifted_sigmas(4, bad)
    with pytest.raises(ValueError, match="steps=0"):
        shifted_sigmas(0, 3.0)


def test_bench_runs_on_a_shifted_schedule(tmp_path):
    """``shift``: the reference images are the sampler's on the shifted schedule (not the uniform one), and a
    method at threshold 0 reproduces them (its calibration ran on the same schedule)."""
    import torch

    from fx_fastcache.bench.report import markdown_table
    from fx_fastcache.trained import load_trained, sample, shifted_sigmas

    cache = tmp_path / "ref.pt"
    res = run_benchmark("flux-mnist", ["none", "step_forecast/forecast"], thresholds=[0.0], n_images=2, steps=2,
                        calib_images=2, timing_images=0, shift=3.0, reference_cache=str(cache))
    assert res["setup"]["shift"] == 3.0 and "(schedule shift 3)" in markdown_table(res)
    tm = load_trained("flux-mnist")
    ref = torch.load(cache)["images"]
    torch.testing.assert_close(ref, sample(tm, [0, 1], [1000, 1001], steps=2, sigmas=shifted_sigmas(2, 3.0)),
                               rtol=0, atol=0)
    assert not torch.allclose(ref, sample(tm, [0, 1], [1000, 1001], steps=2), atol=1e-3)
    exact = [r for r in res["runs"] if r["kind"] == "fastcache"]
    assert len(exact) == 1 and exact[0]["psnr_mean"] == 100.0 and exact[0]["replaced_fraction"] == 0.0


@pytest.mark.slow
def test_bench_cli_smoke(tmp_path, capsys, caplog):
    from fx_fastcache.cli.main import main

    with caplog.at_level(logging.WARNING, logger="fx_fastcache"):  # timing batch = quality batch: one capture
        rc = main(["bench", "--model", "dit-mnist", "--images", "2", "--steps", "2", "--calib-images", "1",
                   "--timing-images", "2", "--methods", "none,step_forecast/forecast,diffusers_fbc,chi2/residual_linear",
                   "--thresholds", "0,1000", "--out", str(tmp_path), "--stem", "smoke"])
    assert rc == 0
    # the bench calibrates its fitted fallbacks: it captured before that and warned they were uncalibrated
    assert not any("is uncalibrated" in r.getMessage() for r in caplog.records)
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"smoke.{ext}").stat().st_size > 0
    assert not (tmp_path / "smoke.partial.json").exists()
    res = json.loads((tmp_path / "smoke.json").read_text())
    runs = {(r["method"], r["threshold"]): r for r in res["runs"]}
    assert len(res["runs"]) == 7
    none = runs[("none", None)]
    assert none["psnr_mean"] == 100.0 and none["replaced_fraction"] == 0.0
    exact = runs[("fastcache[step_forecast/forecast]", 0.0)]
    assert exact["replaced_fraction"] == 0.0 and exact["psnr_mean"] == 100.0  # threshold 0: identical images
    # with 2 steps and warm-up 2 nothing can be skipped, whatever the threshold
    assert runs[("fastcache[step_forecast/forecast]", 1000.0)]["replaced_fraction"] == 0.0
    # diffusers' FBC skips the second step's 11 later blocks at a huge threshold: 11 of 24 block evaluations
    peer = runs[("diffusers_fbc", 1000.0)]
    assert peer["replaced_fraction"] == pytest.approx(11 / 24)
    assert 0 < peer["flops_saved"] < peer["replaced_fraction"]  # block 0 and the embedding/head still run
    for r in res["runs"]:  # the speedup is the ratio of the two timings measured side by side
        assert r["speedup"] == pytest.approx(r["time_per_image_uncached_s"] / r["time_per_image_s"])
    assert "| diffusers_fbc |" in (tmp_path / "smoke.md").read_text()
    assert "wrote" in capsys.readouterr().out


def test_block_flops_count_every_block_list():
    """Flux's blocks are two lists (double-stream, then single-stream): FLOPs saved counts both."""
    from fx_fastcache.bench.runner import block_flops
    from fx_fastcache.trained import load_trained

    total, per_block = block_flops(load_trained("flux-mnist"), 2)
    assert len(per_block) == 8 and min(per_block) > 0
    assert 0.9 < sum(per_block) / total <= 1.0
