"""``bnkit bench --device cuda``: its dry run on the CPU end to end, and its errors."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnkit.bench import cli, cuda

CONTENDERS = {
    "forward": ["torch", "compiled", "bnkit"],
    "fwd+bwd": ["torch", "compiled", "bnkit"],
    "options fwd+bwd": ["bnkit", "bnkit mask", "bnkit ghost", "bnkit renorm"],
    "leaky_relu fwd+bwd": ["torch+leaky_relu", "bnkit leaky_relu"],
}


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bnkit")
    cli.add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_dry_run_measures_every_row_through_the_triton_kernels(tmp_path: Path) -> None:
    out = tmp_path / "cuda.json"
    argv = ["--device", "cpu-triton", "--layout", "nchw", "--dtype", "float32"]
    process = subprocess.run(
        [sys.executable, "-m", "bnkit.bench", *argv, "--repetitions", "1", "--json", str(out)],
        env={**os.environ, **cuda.DRY_RUN_ENV},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.splitlines()[0].endswith("Triton; torch.compile backend aot_eager")
    assert "copy (floor)" in process.stdout
    report = json.loads(out.read_text())
    assert report["machine"]["kernel"] == "Triton"  # bnkit's layer ran the Triton kernels
    assert report["machine"]["compile_backend"] == "aot_eager"
    assert report["skipped"] == []
    rows = report["rows"]
    assert [row["row"] for row in rows] == list(cuda.ROWS)
    for row in rows:
        assert row["shape"] == list(cuda.DRY_RUN_SHAPES[0])
        assert (row["layout"], row["dtype"]) == ("nchw", "float32")
        assert row["errors"] == {}
        assert list(row["results"]) == CONTENDERS[row["row"]]
        assert row["reference"] == CONTENDERS[row["row"]][0]
        assert row["passes"] == (3 if row["row"] == "forward" else 8)
        assert _positive(row["copy_ms"])
        assert _positive(row["copy_gbs"])
        for name, result in row["results"].items():
            for key in ("ms", "vs_reference", "gbs", "of_floor"):
                assert _positive(result[key]), (row["row"], name, key, result[key])
            assert result["peak_mb"] is None  # no peak memory on the CPU
            assert math.isclose(
                result["gbs"], row["passes"] * row["megabytes"] / result["ms"], rel_tol=1e-9
            )
        assert row["results"][row["reference"]]["vs_reference"] == 1.0
        assert (row["compile_s"] is not None) == ("compiled" in row["results"])
    # the printed table has a line per contender and the copy, per row
    lines = [line for line in process.stdout.splitlines() if line.startswith("2x3x2x2")]
    assert len(lines) == sum(len(names) + 1 for names in CONTENDERS.values()) + 2


def test_no_cuda_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.run_command(_parse("--device", "cuda", "--quick"), []) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("bnkit bench: --device cuda: no CUDA device available")
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--op", "eval"], "--op applies to --device cpu only"),
        (["--thp", "off"], "--thp applies to --device cpu only"),
        (["--shape", "4x3"], "shapes N x C x H x W"),
        (["--dtype", "float16"], "float32 and bfloat16"),
    ],
)
def test_cpu_only_options_are_refused_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.run_command(_parse("--device", "cpu-triton", *argv), []) == 1
    error = capsys.readouterr().err
    assert message in error
    assert error.count("\n") == 1


def test_help_offers_cpu_and_cuda_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse("--help")
    text = capsys.readouterr().out
    assert "--device {cpu,cuda}" in text
    assert "cpu-triton" not in text
    with pytest.raises(SystemExit):
        _parse("--device", "tpu")
    assert "expected cpu or cuda" in capsys.readouterr().err


def test_default_and_quick_cover_resnet50_at_batch_32_and_256() -> None:
    default = cuda.options_from(_parse("--device", "cuda"))
    assert {shape[0] for shape in default.shapes} == {32, 256}
    assert len(default.shapes) == 10
    assert (256, 64, 112, 112) in default.shapes
    assert (32, 2048, 7, 7) in default.shapes
    assert tuple(default.dtypes) == ("float32", "bfloat16")
    assert tuple(default.layouts) == ("nchw", "channels_last")
    quick = cuda.options_from(_parse("--device", "cuda", "--quick"))
    assert set(quick.shapes) < set(default.shapes)
    assert quick.budget_s is not None
    assert default.budget_s is not None
    assert quick.budget_s < default.budget_s <= 300
    assert cuda.options_from(_parse("--device", "cuda", "--budget", "50")).budget_s == 50


def test_floor_and_speed_arithmetic() -> None:
    # copy: 1 s for 2 passes; a contender taking 4 s for 8 passes runs at the floor
    summary = cuda._summary([4.0, 8.0, 4.0], [8.0, 8.0, 8.0], [1.0, 1.0, 1.0], 8, 10**9)
    assert summary["ms"] == 4000.0
    assert summary["vs_reference"] == 2.0
    assert summary["gbs"] == 2.0
    assert summary["of_floor"] == 1.0


def test_cpu_device_times_and_skips_peak_memory() -> None:
    device = cuda.Device("cpu")
    calls: list[int] = []
    assert device.seconds(lambda: calls.append(1), 3) > 0
    assert calls == [1, 1, 1]
    assert device.peak_bytes(lambda: calls.append(2)) is None
    assert calls == [1, 1, 1]  # not called where it cannot be measured


def test_the_budget_skips_what_it_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "kernel_name", lambda device: "Triton")
    measured: list[object] = []
    monkeypatch.setattr(cuda, "measure_row", lambda *args: measured.append(args))
    options = cuda.Options(shapes=cuda.DRY_RUN_SHAPES, dtypes=("float32",), budget_s=1e-9)
    report = cuda.run(options, cuda.Device("cpu"))
    assert measured == []
    assert report["rows"] == []
    assert [case["layout"] for case in report["skipped"]] == ["nchw", "channels_last"]
