"""Schedule tables and files: nothing is coerced to a boolean, every error names the file or the value.

Covers ``Schedule.load`` / ``Schedule.from_dict`` (files), the ``Schedule`` constructor and
``fastcache.set_schedule`` (tables); after a rejected table the model keeps working, bit-exact
with a fresh model given the same valid table.
"""
from __future__ import annotations

import json

import pytest
import torch

import fx_fastcache as fastcache
from fx_fastcache.cli.main import main
from fx_fastcache.export.schedule import FORMAT, Schedule
from fx_fastcache.policies.schedule import MAX_STEPS
from fx_fastcache.zoo import make_tiny

BLOCKS = ["transformer_blocks.0", "transformer_blocks.1"]


def _doc(**changes):
    d = {"format": FORMAT, "model": "tiny-dit", "fingerprint": "abc", "steps": 3, "blocks": BLOCKS,
         "config": {"policy": "step_forecast"}, "table": [[False, False], [True, False], [True, True]], "meta": {}}
    d.update(changes)
    return d


def _write(tmp_path, obj, name="S.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def test_a_valid_file_loads(tmp_path):
    s = Schedule.load(_write(tmp_path, _doc()))
    assert s.table == [[False, False], [True, False], [True, True]] and s.steps == 3


@pytest.mark.parametrize("table, needle", [
    ([[False, False], [1, 0], [True, True]], "row 1, column 0 is 1 (int)"),
    ([[False, False], [True, None], [True, True]], "row 1, column 1 is null"),
    ([[False, False], [0.3, False], [True, True]], "row 1, column 0 is 0.3 (float)"),
    ([[False, False], [True, "yes"], [True, True]], "row 1, column 1 is 'yes' (str)"),
    ([[False, False], True, [True, True]], "row 1 is True"),
    ("xx", "'table' is a str"),
], ids=["int", "null", "float", "string", "row-not-a-list", "table-not-a-list"])
def test_non_boolean_entries_are_rejected_naming_file_and_value(tmp_path, table, needle):
    p = _write(tmp_path, _doc(table=table))
    with pytest.raises(ValueError) as e:
        Schedule.load(p)
    assert str(p) in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("top", [[[False, False]], "schedule", 3, None], ids=["list", "string", "number", "null"])
def test_top_level_not_an_object(tmp_path, top):
    p = _write(tmp_path, top)
    with pytest.raises(ValueError) as e:
        Schedule.load(p)
    msg = str(e.value)
    assert str(p) in msg and "at the top level" in msg and FORMAT in msg


@pytest.mark.parametrize("changes, needle", [
    ({"table": [[False, False], [True], [True, True]]}, "row 1 has 1 entries"),
    ({"table": [[False, False, False]], "steps": 1}, "3 entries per row"),
    ({"table": [[True, False], [False, False], [False, False]]}, "step 0"),
    ({"table": []}, "empty"),
    ({"steps": 4}, "'steps' is 4 but the table has 3 rows"),
    ({"steps": "3"}, "'steps' must be an integer"),
    ({"blocks": "transformer_blocks.0"}, "'blocks' must be a list"),
    ({"blocks": [0, 1]}, "'blocks' must be a list"),
    ({"fingerprint": 12}, "'fingerprint' must be a string"),
    ({"config": {"policy": "bogus"}}, "'bogus'"),
    ({"config": {"nope": 1}}, "'nope'"),
    ({"config": []}, "'config' must be an object"),
    ({"meta": 3}, "'meta' must be an object"),
    ({"format": "v0"}, "not an fx-fastcache schedule"),
], ids=["ragged", "blocks-mismatch", "skip-at-step-0", "empty", "steps-mismatch", "steps-type", "blocks-type",
        "block-names", "fingerprint-type", "config-policy", "config-field", "config-type", "meta-type", "format"])
def test_malformed_fields_name_file_and_field(tmp_path, changes, needle):
    p = _write(tmp_path, _doc(**changes))
    with pytest.raises(ValueError) as e:
        Schedule.load(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_missing_fields_are_listed(tmp_path):
    d = _doc()
    del d["fingerprint"], d["config"]
    p = _write(tmp_path, d)
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['fingerprint', 'config'\]") as e:
        Schedule.load(p)
    assert str(p) in str(e.value)


def test_too_many_steps_for_the_policy(tmp_path):
    rows = [[False, False]] * (MAX_STEPS + 1)
    p = _write(tmp_path, _doc(table=rows, steps=len(rows)))
    with pytest.raises(ValueError) as e:
        Schedule.load(p)
    assert str(p) in str(e.value) and f"{MAX_STEPS + 1} steps" in str(e.value) and str(MAX_STEPS) in str(e.value)


@pytest.mark.parametrize("content, needle", [("{not json", "not valid JSON"), (b"\xff\xfe\x00", "not UTF-8")],
                         ids=["json", "binary"])
def test_unreadable_files(tmp_path, content, needle):
    p = tmp_path / "S.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as e:
        Schedule.load(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_a_folder_or_a_missing_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        Schedule.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        Schedule.load(tmp_path / "missing.json")
    assert str(tmp_path / "missing.json") in str(e.value)


def test_constructor_does_not_coerce():
    with pytest.raises(TypeError, match=r"row 1, column 1 is 0 \(int\)"):
        Schedule([[False, False], [True, 0]], BLOCKS, "abc", {})
    with pytest.raises(TypeError, match=r"row 1, column 0 is null"):
        Schedule([[False, False], [None, False]], BLOCKS, "abc", {})


# -- `fx-fastcache schedule` writing a file


def test_schedule_command_records_without_the_grad_warning(tmp_path, caplog):
    """The command calls the model itself: under no_grad, so its users see no advice to use no_grad."""
    out = tmp_path / "S.json"
    assert main(["schedule", "--model", "tiny-dit", "--out", str(out), "--steps", "4", "--generations", "1",
                 "--batch", "1", "--no-progress"]) == 0
    assert Schedule.load(out).steps == 4
    assert not [r for r in caplog.records if "gradients enabled" in r.getMessage()]


def test_schedule_command_refuses_a_planned_calibration_naming_a_cli_fix(tmp_path, capsys):
    tm = make_tiny("tiny-dit")  # the model `--model tiny-dit` builds (same fingerprint)
    opt = fastcache.optimize(tm.model, backend="eager", policy="planned")
    with fastcache.calibrate(opt), torch.no_grad():
        _generation(opt, tm)
    cal = tmp_path / "planned.safetensors"
    fastcache.save_calibration(opt, cal)
    assert main(["schedule", "--model", "tiny-dit", "--out", str(tmp_path / "S.json"), "--steps", "4",
                 "--calibration", str(cal)]) == 2
    err = capsys.readouterr().err
    assert f"--calibration {str(cal)!r} was calibrated with policy='planned'" in err
    assert "--policy step_forecast" in err and "installed_schedule" in err
    assert "configure policy" not in err  # load_calibration's advice for Python, which the CLI cannot follow
    assert not (tmp_path / "S.json").exists()


# -- fastcache.set_schedule


def _generation(opt, tm, steps=4):
    fastcache.reset(opt)
    outs = []
    for t in torch.linspace(1000.0, 0.0, steps + 1)[:-1].tolist():
        out = opt(**tm.make_inputs(t, 2))
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def _table() -> torch.Tensor:
    table = torch.zeros(4, 3, dtype=torch.bool)  # tiny-custom has 3 blocks
    table[2:, 1] = True
    return table


@pytest.fixture(scope="module")
def fresh_generation():
    tm = make_tiny("tiny-custom")
    fresh = fastcache.optimize(tm.model, backend="eager", policy="schedule", warmup_steps=0)
    fastcache.set_schedule(fresh, _table())
    return _generation(fresh, tm)


@pytest.fixture(scope="module")
def opt_with_table():
    """One model shared by the cases: each rejected table must leave it exactly as it was."""
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager", policy="schedule", warmup_steps=0)
    fastcache.set_schedule(opt, _table())
    return opt, tm


@pytest.mark.parametrize("bad, err, needle", [
    (torch.zeros(4, 3), TypeError, "dtype torch.float32"),
    (torch.zeros(4, 3, dtype=torch.long), TypeError, "dtype torch.int64"),
    ([[False] * 3, [1, 0, 0]], TypeError, "row 1, column 0 is 1 (int)"),
    ([[False] * 3, [None, False, False]], TypeError, "row 1, column 0 is null"),
    ([[False] * 3, [0.5, False, False]], TypeError, "row 1, column 0 is 0.5 (float)"),
    ({"table": [[False] * 3]}, TypeError, "is a dict"),
    (torch.zeros(3, dtype=torch.bool), ValueError, "shape (3,)"),
    (torch.zeros(4, 2, dtype=torch.bool), ValueError, "shape (4, 2)"),
    (torch.zeros(MAX_STEPS + 1, 3, dtype=torch.bool), ValueError, f"{MAX_STEPS + 1} steps"),
], ids=["float-tensor", "int-tensor", "int", "none", "float", "dict", "1-d", "blocks", "too-long"])
def test_set_schedule_rejects_and_the_model_still_works(bad, err, needle, fresh_generation, opt_with_table):
    opt, tm = opt_with_table
    with pytest.raises(err) as e:
        fastcache.set_schedule(opt, bad)
    assert needle in str(e.value)
    got = _generation(opt, tm)
    assert fastcache.get_cache_statistics(opt)["blocks_approximated"] == 2  # the installed table still decides
    for a, b in zip(got, fresh_generation):
        assert torch.equal(a, b)


def test_set_schedule_accepts_bool_lists_and_numpy():
    np = pytest.importorskip("numpy")
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager", policy="schedule")
    fastcache.set_schedule(opt, [[False, False, False], [True, False, True]])
    fastcache.set_schedule(opt, np.array([[False, False, False], [True, True, True]]))
    fastcache.set_schedule(opt, [[np.bool_(False)] * 3])


def test_record_schedule_counts_cfg_contexts_as_one_generation():
    """With CFG as two calls per step in two cache contexts (Flux true CFG, Wan, the turn-taking pipelines)
    the uncond call's row overwrote the cond call's, and its step 0 opened a second generation
    (``generations`` 2 for one).  Each context now votes on its own rows within its generation."""
    from fx_fastcache.export import record_schedule

    tm = make_tiny("tiny-wan")
    opt = fastcache.optimize(tm.model, backend="eager", cache_ratio_threshold=1e6, warmup_steps=2)
    inputs = tm.make_inputs(1000.0, 2)
    uncond = torch.zeros_like(inputs["encoder_hidden_states"])

    def run():
        x = inputs["hidden_states"]
        with torch.no_grad():
            for t in [1000.0, 900.0, 800.0, 700.0, 600.0]:
                with opt.cache_context("cond"):
                    c = opt(**dict(inputs, hidden_states=x, timestep=torch.full((2,), t)))[0]
                with opt.cache_context("uncond"):
                    u = opt(**dict(inputs, hidden_states=x, timestep=torch.full((2,), t),
                                   encoder_hidden_states=uncond))[0]
                x = x - 0.05 * (u + 2.0 * (c - u))

    sched = record_schedule(opt, run, generations=2)
    assert sched.meta["generations"] == 2 and sched.steps == 5
    assert [any(row) for row in sched.table] == [False, False, True, True, True]  # warm-up 2, then skipped


def test_record_schedule_leaves_out_uncached_calls():
    """SD3's skip-layer calls run the model itself; the recorder read the last graph's step for them and
    wrote an all-False row over the guided call's: with skip-layer guidance nothing was recorded as skipped."""
    from fx_fastcache.export import record_schedule
    from fx_fastcache.tiny_pipelines import make_tiny_pipeline

    tp = make_tiny_pipeline("sd3")
    tr = fastcache.enable_fastcache(tp.pipe, backend="eager", cache_ratio_threshold=5.0, warmup_steps=1)
    tables = [record_schedule(tr, lambda: tp.pipe(**tp.call_kwargs(num_inference_steps=6, guidance_scale=5.0,
                                                                  **extra))).table
              for extra in ({}, dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                                     skip_layer_guidance_stop=1.0))]
    assert tables[1] == tables[0] and any(any(row) for row in tables[0])
