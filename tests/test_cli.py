"""The command line: a user error prints one line naming the value and exits 2; --debug shows the traceback.

Every case fails before any model is captured (arguments, names and files are checked up front),
so these tests run in-process in well under a second each.
"""
from __future__ import annotations

import json

import pytest

from fx_fastcache.cli.main import main
from fx_fastcache.policies.schedule import MAX_STEPS
from fx_fastcache.zoo import TINY


def _one_line_error(capsys, argv: list[str], status: int = 2) -> str:
    assert main(argv) == status
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert "Traceback" not in cap.err
    return lines[0]


def _schedule_file(tmp_path, **changes) -> str:
    d = {"format": "fx-fastcache/schedule/1", "model": "tiny-dit", "fingerprint": "x", "steps": 2,
         "blocks": ["transformer_blocks.0", "transformer_blocks.1"], "config": {},
         "table": [[False, False], [True, False]], "meta": {}}
    d.update(changes)
    p = tmp_path / "S.json"
    p.write_text(json.dumps(d))
    return str(p)


# -- export-onnx


def test_export_onnx_batch_zero_is_an_error_not_the_default(tmp_path, capsys):
    line = _one_line_error(capsys, ["export-onnx", "--model", "tiny-dit", "--schedule", _schedule_file(tmp_path),
                                    "--out", str(tmp_path / "M.onnx"), "--batch", "0"])
    assert line.startswith("fx-fastcache export-onnx: error:")
    assert "--batch" in line and "got 0" in line and ">= 1" in line
    assert not (tmp_path / "M.onnx").exists()


def test_export_onnx_missing_schedule_names_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    line = _one_line_error(capsys, ["export-onnx", "--model", "tiny-dit", "--schedule", str(missing),
                                    "--out", str(tmp_path / "M.onnx")])
    assert str(missing) in line and "fx-fastcache schedule" in line


def test_export_onnx_schedule_with_numbers_names_file_and_value(tmp_path, capsys):
    path = _schedule_file(tmp_path, table=[[False, False], [1, 0]])
    line = _one_line_error(capsys, ["export-onnx", "--model", "tiny-dit", "--schedule", path,
                                    "--out", str(tmp_path / "M.onnx")])
    assert path in line and "row 1, column 0 is 1 (int)" in line


def test_export_onnx_schedule_of_another_model_names_the_file(tmp_path, capsys):
    path = _schedule_file(tmp_path)  # blocks of tiny-dit, fingerprint "x"
    line = _one_line_error(capsys, ["export-onnx", "--model", "tiny-dit", "--schedule", path,
                                    "--out", str(tmp_path / "M.onnx")])
    assert path in line and "recorded on another model" in line and "fx-fastcache schedule" in line
    assert not (tmp_path / "M.onnx").exists()


@pytest.mark.parametrize("opset", ["13", "26"])
def test_export_onnx_unsupported_opset(opset, tmp_path, capsys):
    """Opsets from 26 on failed inside the exporter with an "internal error" and left an invalid file."""
    line = _one_line_error(capsys, ["export-onnx", "--model", "tiny-dit", "--schedule", _schedule_file(tmp_path),
                                    "--out", str(tmp_path / "M.onnx"), "--opset", opset])
    assert f"--opset {opset}" in line and "18 to 25" in line
    assert not (tmp_path / "M.onnx").exists()


# -- model names (every subcommand that takes --model)


@pytest.mark.parametrize("argv", [
    ["diff", "{m}"],
    ["schedule", "--model", "{m}", "--out", "{tmp}/S.json"],
    ["export-onnx", "--model", "{m}", "--schedule", "{sched}", "--out", "{tmp}/M.onnx"],
], ids=["diff", "schedule", "export-onnx"])
def test_model_not_found_lists_every_name(argv, tmp_path, capsys):
    argv = [a.format(m="tiny-ditt", tmp=tmp_path, sched=_schedule_file(tmp_path)) for a in argv]
    line = _one_line_error(capsys, argv)
    assert "'tiny-ditt'" in line and "not found" in line and "did you mean 'tiny-dit'" in line
    for name in ["dit-mnist", "pixart-mnist", "sd3-mnist", "flux-mnist", "wan-mnist", *TINY]:
        assert name in line
    assert "config.json" in line  # how to pass a folder instead


def test_folder_without_config_is_named(tmp_path, capsys):
    line = _one_line_error(capsys, ["diff", str(tmp_path)])
    assert str(tmp_path) in line and "no config.json" in line


@pytest.mark.parametrize("text, needle", [("{bad", "is not valid JSON"), ("[]", "holds a list")])
def test_malformed_config_json_is_named(text, needle, tmp_path, capsys):
    """A broken config.json gave json's message without the file, or an internal AttributeError."""
    (tmp_path / "config.json").write_text(text)
    line = _one_line_error(capsys, ["diff", str(tmp_path)])
    assert str(tmp_path / "config.json") in line and needle in line


# -- schedule


def test_schedule_steps_beyond_the_policy_table(tmp_path, capsys):
    line = _one_line_error(capsys, ["schedule", "--model", "tiny-dit", "--out", str(tmp_path / "S.json"),
                                    "--steps", str(MAX_STEPS + 76)])
    assert f"{MAX_STEPS + 76} steps" in line and f"--steps {MAX_STEPS}" in line
    assert not (tmp_path / "S.json").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--policy", "bogus"], "'bogus'"),
    (["--policy", "schedule"], "--policy schedule"),
    (["--policy", "planned"], "--policy planned replays a table"),
    (["--threshold", "-1"], "--threshold"),
    (["--generations", "0"], "--generations"),
    (["--calibration", "{tmp}/none.safetensors"], "none.safetensors"),
], ids=["unknown-policy", "replay-policy", "planned-policy", "negative-threshold", "zero-generations",
        "missing-calibration"])
def test_schedule_argument_errors(extra, needle, tmp_path, capsys):
    extra = [e.format(tmp=tmp_path) for e in extra]
    line = _one_line_error(capsys, ["schedule", "--model", "tiny-dit", "--out", str(tmp_path / "S.json"), *extra])
    assert line.startswith("fx-fastcache schedule: error:") and needle in line


# -- bench, demo, diff, export-trt


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--model", "tiny-dit"], "needs a trained model"),
    (["bench", "--model", "pixart"], "did you mean 'pixart-mnist'"),
    (["bench", "--model", "sd3-mnst"], "did you mean 'sd3-mnist'"),
    (["bench", "--methods", "bogus"], "'bogus'"),
    (["bench", "--images", "0"], "--images"),
    (["bench", "--images", "1"], "--images 1"),
    (["bench", "--thresholds", "a,b"], "'a,b'"),
    (["bench", "--thresholds", "0.5,nan"], "finite non-negative thresholds, got '0.5,nan'"),
    (["bench", "--cfg", "inf"], "expected a finite number, got 'inf'"),
    (["bench", "--shift", "0"], "--shift 0.0: the schedule shift must be > 0"),
    (["bench", "--shift", "nan"], "expected a finite number, got 'nan'"),
], ids=["tiny-model", "typo", "typo-sd3", "unknown-method", "zero-images", "one-image", "thresholds", "nan-threshold",
        "inf-cfg", "zero-shift", "nan-shift"])
def test_bench_argument_errors(argv, needle, capsys):
    line = _one_line_error(capsys, argv)
    assert line.startswith("fx-fastcache bench") and needle in line


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--images", "0"], "--images"),
    (["demo", "--steps", "x"], "'x'"),
    (["demo", "--calib-seed", "101"], "--calib-seed 101"),
    (["demo", "--cfg", "nan"], "expected a finite number, got 'nan'"),
], ids=["zero-images", "steps-not-int", "seed-overlap", "nan-cfg"])
def test_demo_argument_errors(argv, needle, tmp_path, capsys):
    line = _one_line_error(capsys, [*argv, "--out", str(tmp_path / "d.png")])
    assert line.startswith("fx-fastcache demo") and needle in line


def test_demo_out_is_a_folder(tmp_path, capsys):
    line = _one_line_error(capsys, ["demo", "--out", str(tmp_path)])
    assert str(tmp_path) in line and "folder" in line


def test_diff_unknown_pass_lists_passes(capsys):
    line = _one_line_error(capsys, ["diff", "tiny-custom", "--pass", "bogus"])
    assert "'bogus'" in line and "guard_blocks" in line


def test_export_trt_missing_requirement_or_file(tmp_path, capsys):
    line = _one_line_error(capsys, ["export-trt", "--onnx", str(tmp_path / "M.onnx"), "--out", str(tmp_path / "M.plan")])
    assert line.startswith("fx-fastcache export-trt: error:")
    assert "TensorRT cannot run here" in line or str(tmp_path / "M.onnx") in line


# -- --debug and internal errors


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, tmp_path, capsys):
    argv = ["export-onnx", "--model", "tiny-dit", "--schedule", str(tmp_path / "nope.json"),
            "--out", str(tmp_path / "M.onnx")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "FileNotFoundError" in err
    assert err.strip().splitlines()[-1].startswith("fx-fastcache export-onnx: error:")


def test_an_internal_error_is_one_line_with_status_1(monkeypatch, tmp_path, capsys):
    import fx_fastcache.cli.diff as diff

    def boom(args):
        raise RuntimeError("something broke\ninside torch")

    monkeypatch.setattr(diff, "run", boom)
    line = _one_line_error(capsys, ["diff", "tiny-dit"], status=1)
    assert "internal error: RuntimeError: something broke; inside torch" in line and "--debug" in line
    assert main(["--debug", "diff", "tiny-dit"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_help_and_no_command():
    assert main(["--help"]) == 0
    assert main([]) == 2


def test_export_onnx_missing_calibration_names_the_file(tmp_path, capsys):
    missing = tmp_path / "C.safetensors"
    line = _one_line_error(capsys, ["export-onnx", "--model", "tiny-dit", "--schedule", _schedule_file(tmp_path),
                                    "--out", str(tmp_path / "M.onnx"), "--calibration", str(missing)])
    assert line.startswith("fx-fastcache export-onnx: error:")
    assert f"--calibration {str(missing)!r}: no such file" in line
