"""Skip schedules: recording from a deciding policy, replay reproduces the run, JSON, errors."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import fx_fastcache as fastcache
from fx_fastcache.calibration import model_fingerprint
from fx_fastcache.export.schedule import (Schedule, apply_schedule, identity_meta, optimize_with_schedule,
                                          record_schedule)
from fx_fastcache.zoo import make_tiny

from conftest import first

STEPS = [1000.0 - 100.0 * i for i in range(8)]


def _loop(model, tm, outs):
    x = tm.make_inputs(STEPS[0], 2)["hidden_states"]
    for t in STEPS:
        kw = tm.make_inputs(t, 2)
        kw["hidden_states"] = x
        y = first(model(**kw))
        outs.append(y.clone())
        x = x - 0.05 * y[:, : x.shape[1]]
    return outs


@pytest.fixture(scope="module")
def recorded():
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", cache_ratio_threshold=0.5, warmup_steps=1)
    outs: list[torch.Tensor] = []
    sched = record_schedule(opt, lambda: _loop(opt, tm, outs), model_name="tiny-dit")
    return tm, sched, outs, fastcache.get_cache_statistics(opt)


def test_recorded_table_shape_and_content(recorded):
    tm, sched, _, stats = recorded
    assert sched.steps == len(STEPS)
    assert sched.blocks == ["transformer_blocks.0", "transformer_blocks.1"]
    assert not any(sched.table[0])
    assert sum(map(sum, sched.table)) == stats["blocks_approximated"] > 0
    assert sched.fingerprint == model_fingerprint(tm.model)
    assert sched.config["policy"] == "step_forecast"


def test_replay_reproduces_recorded_run(recorded):
    tm, sched, ref, _ = recorded
    opt = optimize_with_schedule(tm.model, sched)
    out = _loop(opt, tm, [])
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=0)
    stats = fastcache.get_cache_statistics(opt)
    assert stats["policy"] == "schedule"
    assert stats["blocks_approximated"] == sum(map(sum, sched.table))


def test_apply_schedule_switches_an_optimized_model(recorded):
    tm, sched, ref, _ = recorded
    opt = fastcache.optimize(tm.model, backend="eager")
    apply_schedule(opt, sched)
    assert opt.fastcache_config.policy == "schedule"
    out = _loop(opt, tm, [])
    torch.testing.assert_close(out[-1], ref[-1], atol=1e-6, rtol=0)


def test_steps_beyond_table_compute_in_full(recorded):
    tm, sched, _, _ = recorded
    short = Schedule(sched.table[:2], sched.blocks, sched.fingerprint, sched.config)
    opt = optimize_with_schedule(tm.model, short)
    _loop(opt, tm, [])
    per_block = fastcache.get_cache_statistics(opt)["blocks_approximated"]
    assert per_block == sum(map(sum, short.table))


def test_json_round_trip(recorded, tmp_path):
    _, sched, _, _ = recorded
    p = tmp_path / "s.json"
    sched.save(p)
    d = json.loads(p.read_text())
    assert d["steps"] == sched.steps and len(d["table"]) == sched.steps and len(d["table"][0]) == len(d["blocks"])
    back = Schedule.load(p)
    assert back.table == sched.table and back.blocks == sched.blocks and back.fingerprint == sched.fingerprint


def test_wrong_model_is_rejected(recorded):
    _, sched, _, _ = recorded
    other = make_tiny("tiny-dit", seed=3)
    with pytest.raises(ValueError, match="fingerprint"):
        optimize_with_schedule(other.model, sched)
    deeper = make_tiny("tiny-dit", layers=3)
    with pytest.raises(ValueError, match="blocks"):
        optimize_with_schedule(deeper.model, sched)


def test_schedule_replays_on_the_model_in_another_dtype(recorded, tmp_path, caplog):
    """A schedule recorded in float32 (all ``fx-fastcache schedule`` records) replays on the same model in
    bfloat16 or float16: the table does not depend on the dtype, the weights' sums do, and the schedule was
    refused as "recorded on another model".  It keeps the fingerprint of each cast; another model (its weights
    moved by 5 % of their spread, or another seed) in bfloat16 is still refused."""
    tm, sched, _, _ = recorded
    sched.save(tmp_path / "s.json")
    loaded = Schedule.load(tmp_path / "s.json")
    for dtype in (torch.bfloat16, torch.float16):
        with caplog.at_level(logging.INFO, logger="fx_fastcache.export.schedule"):
            opt = optimize_with_schedule(copy.deepcopy(tm.model).to(dtype), loaded)
        assert f"recorded on this model in torch.float32; it is {dtype} now" in caplog.text
        assert torch.equal(opt.installed_schedule()[: sched.steps], sched.tensor())
    nudged = copy.deepcopy(tm.model)
    with torch.no_grad():
        for p in nudged.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p) if p.numel() > 1 else 0.0)
    for other in (nudged, make_tiny("tiny-dit", seed=3).model):
        with pytest.raises(ValueError, match="fingerprint"):
            optimize_with_schedule(other.to(torch.bfloat16), loaded)
    # recorded on the model in bfloat16, replayed on it in float32
    bf16 = copy.deepcopy(tm.model).to(torch.bfloat16)
    in_bf16 = Schedule(sched.table, sched.blocks, model_fingerprint(bf16), sched.config, meta=identity_meta(bf16))
    optimize_with_schedule(copy.deepcopy(tm.model), in_bf16)


def test_schedule_replays_on_a_model_loaded_in_bfloat16_with_float32_modules(tmp_path):
    """diffusers' ``from_pretrained(torch_dtype=torch.bfloat16)`` keeps ``_keep_in_fp32_modules`` in float32
    (Wan): the model as loaded matches no plain cast; both sides cast wholly to bfloat16 compare."""
    from diffusers import WanTransformer3DModel

    tm = make_tiny("tiny-wan")
    tm.model.save_pretrained(tmp_path / "w")
    opt = fastcache.optimize(tm.model, backend="eager", policy="schedule")
    with torch.no_grad():
        opt(**tm.make_inputs(1000.0, 2))
    fastcache.set_schedule(opt, torch.tensor([[False] * 2, [True] * 2]))
    from fx_fastcache.export.schedule import installed_schedule

    sched = installed_schedule(opt)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "w", torch_dtype=torch.bfloat16)
    assert loaded.scale_shift_table.dtype == torch.float32
    optimize_with_schedule(loaded, sched)  # recorded in float32, replayed in bfloat16
    in_bf16 = installed_schedule(optimize_with_schedule(loaded, sched))
    optimize_with_schedule(make_tiny("tiny-wan").model, in_bf16)  # and back
    with pytest.raises(ValueError, match="fingerprint"):
        optimize_with_schedule(make_tiny("tiny-wan", seed=3).model.to(torch.bfloat16), sched)


def test_record_schedule_over_a_generation_that_changes_shape():
    """cfg_truncation drops the batch in the middle of a generation, and the new shapes' graph starts its clock
    again: the recorder took that for a second generation, whose rows voted on the first steps."""
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", cache_ratio_threshold=1e6, warmup_steps=2)

    def run():
        with torch.no_grad():
            for step in range(8):
                opt(**tm.make_inputs(1000.0 - 100 * step, 2 if step < 4 else 1))

    sched = record_schedule(opt, run)
    assert sched.meta["generations"] == 1
    assert [any(row) for row in sched.table] == [False, False, True, True, False, False, True, True]


def test_invalid_schedules_are_rejected(recorded, tmp_path):
    _, sched, _, _ = recorded
    with pytest.raises(ValueError, match="step 0"):
        Schedule([[True, False]], sched.blocks, sched.fingerprint, sched.config)
    with pytest.raises(ValueError, match="row 1 has 1 entries"):
        Schedule([[False, False], [True]], sched.blocks, sched.fingerprint, sched.config)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an fx-fastcache schedule"):
        Schedule.load(bad)
    with pytest.raises(FileNotFoundError, match="fx-fastcache schedule"):
        Schedule.load(tmp_path / "missing.json")
    bad.write_text(json.dumps(dict(sched.to_dict(), meta={"fingerprints": ["x"]})))
    with pytest.raises(ValueError, match=r"bad.json.*'meta.fingerprints' must be an object"):
        Schedule.load(bad)


def test_cli_schedule_writes_a_loadable_file(tmp_path, capsys):
    from fx_fastcache.cli.main import main

    out = tmp_path / "S.json"
    assert main(["schedule", "--model", "tiny-sd3", "--out", str(out), "--steps", "5", "--generations", "1",
                 "--batch", "2", "--threshold", "0.5"]) == 0
    s = Schedule.load(out)
    assert s.steps == 5 and s.blocks == ["transformer_blocks.0", "transformer_blocks.1"]
    assert "5 steps x 2 blocks" in capsys.readouterr().out


def test_steps_past_the_longest_table_compute():
    """A 1024-row table (the most a schedule holds) repeated its last row for every later step in the
    graph, while step dispatch computed there."""
    from fx_fastcache.policies.schedule import MAX_STEPS, ScheduleDecider, store_key
    from fx_fastcache.runtime.store import CalibrationStore

    store = CalibrationStore()
    decider = ScheduleDecider("blocks.0", "cpu", store)
    store.tensors[store_key("blocks.0")].fill_(True)
    yes = torch.tensor(True)
    at = [bool(decider(torch.tensor(float(s)), ~yes, yes, None, None, None)) for s in (MAX_STEPS - 1, MAX_STEPS, 5000)]
    assert at == [True, False, False]


def test_replay_on_a_model_optimized_with_its_own_block_lists():
    """A schedule recorded on ``optimize(model, blocks=[...])`` (a model of no registered family) could not be
    replayed by ``optimize_with_schedule``: it looked the blocks up without the lists and failed."""
    from test_spans import _TwoLists

    torch.manual_seed(0)
    model = _TwoLists().eval()
    x0 = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(1))

    def loop(m):
        x, outs = x0.clone(), []
        with torch.no_grad():
            for t in torch.linspace(999, 100, 6).tolist():
                outs.append(m(x=x, timestep=torch.full((2,), t)).clone())
                x = x - 0.1 * outs[-1]
        return outs

    opt = fastcache.optimize(model, backend="eager", blocks=["first", "second"], cache_ratio_threshold=0.3)
    rec = {}
    sched = record_schedule(opt, lambda: rec.setdefault("outs", loop(opt)))
    assert sched.blocks == ["first.0", "first.1", "second.0", "second.1"] and 0 < sched.skip_ratio < 1
    for blocks in (None, ["first", "second"]):
        for a, b in zip(loop(optimize_with_schedule(model, sched, blocks=blocks)), rec["outs"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
