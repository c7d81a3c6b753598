"""``bnkit bench`` runs and reports its figures (a smoke test: no timing is checked)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bnkit.bench import cli, speed

TINY = ["--shape", "8x16x8x8", "--shape", "64x32", "--repetitions", "1"]


@pytest.mark.slow
def test_quick_run_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    process = subprocess.run(
        [sys.executable, "-m", "bnkit.bench", "--quick", *TINY, "--json", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr
    assert "THP_MEM_ALLOC_ENABLE=1" in process.stdout
    assert "torch ms" in process.stdout
    assert "bnkit ms" in process.stdout
    report = json.loads(out.read_text())
    run = report["runs"]["on"]
    assert {"cpu", "torch", "torch_threads", "native_kernel"} <= set(run["machine"])
    assert run["machine"]["THP_MEM_ALLOC_ENABLE"] == "1"
    rows = run["rows"]
    # (8, 16, 8, 8) in two layouts, (64, 32) in one: 3 x 4 operations
    assert len(rows) == 12
    assert {row["operation"] for row in rows} == set(speed.DEFAULT_OPERATIONS)
    for row in rows:
        assert row["floor_ms"] > 0
        assert row["bandwidth_gbs"] > 0
        probes = row["probe_bandwidth_gbs"]
        assert {"copy", "triad"} <= set(probes)
        assert max(probes.values()) >= row["bandwidth_gbs"] * 0.999
        assert row["floor_with_outputs_ms"] >= row["floor_ms"]
        assert row["new_output_ms"] >= 0
        for name in ("torch", "bnkit"):
            result = row["results"][name]
            assert set(result) == {"ms", "vs_torch", "of_floor", "of_floor_with_outputs"}
            assert result["of_floor_with_outputs"] >= result["of_floor"]
        assert row["results"]["torch"]["vs_torch"] == 1.0


def test_registers_on_a_parent_parser() -> None:
    parser = argparse.ArgumentParser(prog="bnkit")
    cli.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--shape", "4x3", "--thp", "both"])
    assert args.run_command is cli.run_command
    assert args.shape == [(4, 3)]
    assert args.thp == "both"


def test_rows_format_without_running(tmp_path: Path) -> None:
    row = speed.measure(
        (4, 3, 2, 2), "channels_last", "float32", "fwd+bwd", speed.Config(repetitions=1)
    )
    assert row is not None
    line = cli.format_row(row)
    assert line.startswith("4x3x2x2")
    assert "x" in line
    assert speed.measure((4, 3), "channels_last", "float32", "eval", speed.Config()) is None
    assert "torch" in cli.format_machine(speed.machine())


@pytest.mark.slow
def test_reuse_memory_runs_with_the_allocator_keeping_freed_memory(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    process = subprocess.run(
        [sys.executable, "-m", "bnkit.bench", *TINY, "--op", "eval", "--reuse-memory", "both",
         "--json", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert "freed memory kept for new tensors" in process.stdout
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"on", "on+reuse"}
    assert runs["on"]["machine"]["freed_memory"] == "returned to the system"
    assert runs["on+reuse"]["machine"]["freed_memory"] == "kept by the allocator"
    assert len(runs["on+reuse"]["rows"]) == 3  # eval on 8x16x8x8 (2 layouts) and 64x32


@pytest.mark.slow
@pytest.mark.parametrize("operation", ["fwd+bwd", "bn+leaky fwd+bwd", "eval"])
# torch.compile's tracing emits these from inside torch
@pytest.mark.filterwarnings("ignore:.*script_method.*is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*should not be instantiated.*:DeprecationWarning")
def test_compile_rows_time_both_compiled_layers(operation: str) -> None:
    """With --compile a row times torch's compiled layer and bnkit's, each against torch
    eager and bnkit's eager speed against torch's compiled layer; the table has a
    column group per implementation."""
    config = speed.Config(repetitions=1, compile=True)
    row = speed.measure((8, 16, 8, 8), "nchw", "float32", operation, config)
    assert row is not None
    assert set(row["results"]) == {"torch", "bnkit", "compiled", "bnkit compiled"}
    assert row["compile_s"] > 0
    for result in row["results"].values():
        assert result["ms"] > 0
        assert "vs_compiled" in result
    header = cli._header(list(cli._NAMES))
    assert "bnkit comp ms" in header
    assert "x comp" in header
    line = cli.format_row(row)
    for name in ("bnkit", "compiled", "bnkit compiled"):
        assert f"{row['results'][name]['ms']:.3f}" in line
