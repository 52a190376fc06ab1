"""Graph diff report: per-block original vs rewritten form, per-pass changes, HTML, --pass."""
from __future__ import annotations

import re

import pytest

from fx_fastcache.inspect_graph import build_report, format_html, format_pass, format_text
from fx_fastcache.zoo import make_tiny

BLOCKS = ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]


@pytest.fixture(scope="module")
def report():
    tm = make_tiny("tiny-flux")
    return build_report(tm.model, tm.make_inputs(1000.0, 2), name="tiny-flux", span="block")


def test_spans_show_their_blocks():
    """span="auto" (default): Flux's joint and single blocks form one guarded span; each block is
    still reported, inside it."""
    tm = make_tiny("tiny-flux")
    r = build_report(tm.model, tm.make_inputs(1000.0, 2), name="tiny-flux")
    assert len(r.spans) == 1 and r.spans[0].blocks == BLOCKS and r.extra["conds"] == 1
    assert [b.name for b in r.blocks] == BLOCKS and all(b.rewritten and b.span == r.spans[0].name for b in r.blocks)
    assert r.blocks[1].ops["linear"] > 0  # per-block op histograms survive the merge
    text = format_text(r)
    assert "Guarded spans (1 cond for 3 blocks)" in text and "(in span transformer_blocks.0..single" in text
    assert "Guarded spans" in format_html(r)


@pytest.mark.parametrize("reduction", [dict(enable_token_routing=True, motion_threshold=0.5),
                                       dict(enable_token_merge=True, merge_ratio=0.5)], ids=["routing", "merging"])
def test_routed_blocks_are_reported_as_rewritten(reduction):
    """With token routing or merging the cond's computed branch is the routed wrapper, which the
    report did not look up: every block read "NOT rewritten", "0 rewritten into cond"."""
    tm = make_tiny("tiny-dit")
    r = build_report(tm.model, tm.make_inputs(1000.0, 2), name="tiny-dit", **reduction)
    assert all(b.rewritten and b.operands > 0 for b in r.blocks)
    assert "2 blocks, 2 rewritten into cond" in format_text(r)


def test_every_block_is_reported_as_rewritten(report):
    assert [b.name for b in report.blocks] == BLOCKS
    for b in report.blocks:
        assert b.rewritten, b.name
        assert b.original_nodes > 0 and b.ops["linear"] > 0
        assert b.guard == f"fastcache_guard_{b.index}" and b.fallback == "ForecastFallback"
        assert b.operands > 0 and b.block_code and "forecast_approx" in b.fallback_code
    text = format_text(report)
    for b in report.blocks:
        assert re.search(rf"\[{b.index}\] {re.escape(b.name)}: REWRITTEN", text)
        assert f"cond(pred, fastcache_fallback_{b.index}, fastcache_block_{b.index}" in text
    assert "NOT rewritten" not in text
    assert "3 blocks, 3 rewritten" in text


def test_joint_and_single_blocks_list_their_streams(report):
    assert report.blocks[0].outputs == ["encoder_hidden_states", "hidden_states"]
    assert report.blocks[2].outputs == ["hidden_states"]  # the last single block's text output is dead


def test_pass_table_counts_match_records(report):
    text = format_text(report)
    names = report.pass_names()
    assert names[0] == "find_blocks" and "guard_blocks" in names
    g = report.get_pass("guard_blocks")
    assert g.added and g.removed and g.nodes_after < g.nodes_before
    assert f"guard_blocks     {g.nodes_before:5d} -> {g.nodes_after:5d} nodes  (+{len(g.added)} added, " \
           f"-{len(g.removed)} removed)" in text


def test_pass_before_after(report):
    out = format_pass(report, "guard_blocks")
    assert "--- before guard_blocks" in out and "+++ after guard_blocks" in out
    assert "+    fastcache_clock = self.fastcache_clock(" in out
    full = format_pass(report, "strip_markers", full=True)
    assert "==== graph before strip_markers ====" in full and "fastcache.mark" in full.split("==== graph after")[0]
    with pytest.raises(ValueError, match="no pass named 'nope'.*guard_blocks"):
        format_pass(report, "nope")


def test_html_is_self_contained_with_collapsible_blocks(report):
    page = format_html(report)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page and "src=" not in page and "href=" not in page
    for b in report.blocks:
        assert f"[{b.index}] {b.name}" in page
        assert f"block branch fastcache_block_{b.index}</summary><pre>" in page
    assert page.count("<details>") >= 3 * len(report.blocks)


def test_cli_diff_text_html_and_pass(tmp_path, capsys):
    from fx_fastcache.cli.main import main

    assert main(["diff", "tiny-dit"]) == 0
    text = capsys.readouterr().out
    assert "[0] transformer_blocks.0: REWRITTEN" in text and "[1] transformer_blocks.1: REWRITTEN" in text
    out = tmp_path / "d.html"
    assert main(["diff", "tiny-dit", "--format", "html", "--out", str(out)]) == 0
    assert "fastcache_block_0" in out.read_text() and "Guarded spans" in out.read_text()  # one span: blocks 0..1
    assert main(["diff", "tiny-dit", "--pass", "hoist_probes"]) == 0
    assert "before hoist_probes" in capsys.readouterr().out
    assert main(["diff", "tiny-dit", "--pass", "bogus"]) == 2
