"""`crosskd benchmark`: every format exported, validated and timed into one table; a failing format is a row."""

import csv
import json
import math
import sys

import pytest
from test_export import write_checkpoint
from test_quantization import INT8_AP_TOLERANCE

from crosskd import cli
from crosskd.config import get_args
from crosskd.engine.deployment import formats
from crosskd.engine.tools import benchmark

DIGIT_NAMES = {i: str(i) for i in range(10)}


def benchmark_args(tmp_path, data, weights, **overrides):
    settings = {"model": str(weights), "data": str(data), "imgsz": 64, "batch": 2, "workers": 0, "device": "cpu",
                "project": str(tmp_path / "runs"), "name": "bench", **overrides}
    return get_args(settings, "benchmark")


def test_benchmark_every_format_end_to_end(tmp_path, trained_digits, capsys):
    weights = tmp_path / "best.pt"
    weights.write_bytes(trained_digits.weights.read_bytes())
    rows = benchmark.run(benchmark_args(tmp_path, trained_digits.data, weights, imgsz=128))
    assert [row.format for row in rows] == ["PyTorch", "TorchScript", "ONNX", "ONNX INT8", "OpenVINO",
                                            "OpenVINO FP16", "OpenVINO INT8"]
    for row in rows:
        assert row.status == "ok", row
        assert row.size_mb > 0.5 and row.ms_per_image > 0 and math.isfinite(row.ap) and math.isfinite(row.ap50)
    by_format = {row.format: row for row in rows}
    floats = [by_format[name] for name in ("PyTorch", "TorchScript", "ONNX", "OpenVINO")]
    assert len({row.ap for row in floats}) == 1  # the same detections through every float runtime
    assert 0.3 < rows[0].ap < rows[0].ap50 < 1.0  # a trained model: a runtime that drifts changes its AP
    tolerances = {"ONNX INT8": INT8_AP_TOLERANCE, "OpenVINO FP16": 0.05, "OpenVINO INT8": INT8_AP_TOLERANCE}
    for name, tolerance in tolerances.items():
        assert abs(by_format[name].ap - rows[0].ap) < tolerance  # close to float (INT8: the CPU's kernels decide)
        assert by_format[name].size_mb < 0.7 * floats[2].size_mb  # and smaller files
    run_dir = tmp_path / "runs" / "bench"
    assert rows[0].file == str(weights.resolve())
    assert (run_dir / "best.onnx").is_file() and (run_dir / "best_openvino_model" / "best.xml").is_file()
    assert (run_dir / "best_int8.onnx").is_file() and (run_dir / "fp16" / "best_openvino_model" / "best.xml").is_file()
    with (run_dir / "benchmark.csv").open() as file:
        assert [record["format"] for record in csv.DictReader(file)] == [row.format for row in rows]
    assert [record["size_mb"] for record in json.loads((run_dir / "benchmark.json").read_text())] == [
        row.size_mb for row in rows
    ]
    table = capsys.readouterr().out
    assert "Benchmarks: best.pt" in table and "OpenVINO" in table and "ms/img" in table


def test_a_failing_format_shows_its_error_in_its_row(tmp_path, write_digits_yaml, monkeypatch):
    data = write_digits_yaml(tmp_path, 2, 4)
    weights = write_checkpoint(tmp_path / "best.pt", "fcos", names=DIGIT_NAMES)
    monkeypatch.setattr(formats, "FORMATS", tuple(f for f in formats.FORMATS if f.name in ("pytorch", "openvino")))
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    pytorch, *openvino = benchmark.run(benchmark_args(tmp_path, data, weights))
    assert pytorch.status == "ok" and math.isfinite(pytorch.ap)
    assert [row.format for row in openvino] == ["OpenVINO", "OpenVINO FP16", "OpenVINO INT8"]
    for row in openvino:
        assert "pip install 'crosskd[openvino]'" in row.status and row.ap is None and row.size_mb is None
    records = json.loads((tmp_path / "runs" / "bench" / "benchmark.json").read_text())
    assert records[1]["status"] == openvino[0].status and records[1]["ap"] is None


def test_benchmark_of_a_model_yaml_or_an_export_exits_2(tmp_path, capsys):
    for model in ("gfl_r18t.yaml", str(tmp_path / "best.onnx")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["benchmark", f"model={model}"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "benchmark exports a trained crosskd checkpoint" in err[0]


def test_benchmark_without_model_and_best_pt_exits_2_before_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    monkeypatch.setenv("CROSSKD_CONFIG_DIR", str(tmp_path / "config"))  # default user settings
    with pytest.raises(SystemExit) as exit_:
        cli.main(["benchmark", "data=digits.yaml"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'benchmark' needs model= (no best.pt under" in err[0]
    assert not (tmp_path / "datasets").exists()  # no demo data generated
