"""``bnkit lab`` and ``bnkit report`` end to end, on tiny runs: files, JSON schema, resume,
--force, determinism, re-rendering, errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnkit.lab import datasets
from bnkit.lab.cli import add_commands
from bnkit.lab.experiments import DEFAULT, get_experiment
from bnkit.lab.report import SECTIONS
from tests.lab.conftest import lab_argv, run_cli

TOP_LEVEL = {
    "experiment",
    "title",
    "section",
    "description",
    "dataset",
    "config",
    "results",
    "claims",
    "figures",
    "headline",
    "environment",
}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnkit")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_defaults_and_hidden_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = parser().parse_args(["lab"])
    assert args.experiments == []
    assert args.dataset == "mnist1d"
    assert args.out == Path("bnkit-lab")
    assert (args.seed, args.full, args.force, args.steps_scale) == (0, False, False, 1.0)
    with pytest.raises(SystemExit):
        parser().parse_args(["lab", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--full" in help_text
    # The default is every experiment.
    assert "Default: ics, learning-rate, regularization," in help_text
    assert "inference-stats, covariate-shift" in help_text
    assert "--steps-scale" not in help_text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lab", "nonsense"], "unknown experiment 'nonsense'"),
        (["lab", "--dataset", "cifar10"], "invalid choice: 'cifar10'"),
        (["lab", "--steps-scale", "0"], "expected a number > 0 and <= 1000, got '0'"),
        (["lab", "--steps-scale", "-1"], "expected a number > 0 and <= 1000, got '-1'"),
        (["lab", "--steps-scale", "inf"], "expected a number > 0 and <= 1000, got 'inf'"),
        (["lab", "--steps-scale", "1e309"], "expected a number > 0 and <= 1000, got '1e309'"),
        (["lab", "--steps-scale", "nan"], "expected a number > 0 and <= 1000, got 'nan'"),
        (["lab", "--steps-scale", "1001"], "expected a number > 0 and <= 1000, got '1001'"),
        (["lab", "--steps-scale", "much"], "expected a number, got 'much'"),
        (["report"], "the following arguments are required: DIR"),
    ],
)
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_out_naming_a_file_is_an_argument_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "results.txt"
    existing.write_text("not a directory")
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["lab", "--out", str(existing)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --out: expected a directory, got the file '{existing}'" in err
    assert "Traceback" not in err


def test_out_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    status, stdout, stderr = run_cli(["lab", "ics", "--out", str(blocker / "out")])
    assert (status, stdout) == (1, "")
    assert stderr == f"bnkit lab: --out: cannot write to {blocker / 'out'}: Not a directory\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_out_is_one_line(tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        status, _, stderr = run_cli(["lab", "ics", "--out", str(tmp_path)])
    finally:
        tmp_path.chmod(0o755)
    assert status == 1
    assert stderr == f"bnkit lab: --out: cannot write to {tmp_path}: Permission denied\n"


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("tqdm", ["lab", "ics"]),
        ("sklearn", ["lab", "ics", "--dataset", "digits", "--no-progress"]),
        ("mnist1d", ["lab", "ics", "--no-progress", "--cache-dir", "{tmp}/cache"]),
        ("matplotlib", ["lab", "ics", "--no-progress"]),
    ],
)
def test_missing_optional_dependency_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, argv: list[str]
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import raises ModuleNotFoundError
    # An imported submodule (sklearn.datasets, after the doctests) would be found without
    # its parent: forget it too.
    for name in [name for name in sys.modules if name.startswith(f"{module}.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "bnkit.lab.plotting", raising=False)  # imports it again
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    status, stdout, stderr = run_cli([*argv, "--out", str(tmp_path / "out")])
    assert (status, stdout) == (1, "")
    assert stderr == (
        f"bnkit lab: the Python package '{module}' is not installed; the lab needs its "
        "optional dependencies: pip install 'bnkit[lab]'\n"
    )


@pytest.mark.parametrize("command", ["lab", "report"])
def test_help_is_plain_text_and_imports_nothing_heavy(command: str) -> None:
    # A fresh interpreter: this one has imported torch and matplotlib already.
    script = (
        "import argparse, contextlib, io, sys\n"
        "from bnkit.lab.cli import add_commands\n"
        "parser = argparse.ArgumentParser(prog='bnkit')\n"
        "add_commands(parser.add_subparsers(dest='command', required=True))\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    parser.parse_args([{command!r}, '--help'])\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'matplotlib'})\n"
        "print(heavy, out.getvalue())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    heavy, _, help_text = result.stdout.partition(" ")
    assert heavy == "[]"
    assert f"usage: bnkit {command}" in help_text
    for markup in ("``", ":func:", ":class:", ":data:", ".. "):
        assert markup not in help_text


@pytest.mark.slow
def test_run_writes_results_plots_and_report(lab_run: tuple[Path, str, str]) -> None:
    out, stdout, _ = lab_run
    names = list(DEFAULT)  # no names: every experiment
    for name in names:
        data = json.loads((out / f"{name}.json").read_text())
        assert set(data) == TOP_LEVEL
        assert data["experiment"] == name
        assert data["dataset"] == "fashion-mnist"
        config = data["config"]
        assert (config["dataset"], config["seed"], config["mode"]) == ("fashion-mnist", 0, "quick")
        assert config["steps_scale"] == 0.005
        assert data["section"] in {section.key for section in SECTIONS}
        assert data["claims"]
        for claim in data["claims"]:
            assert {"claim", "anchor", "measured", "holds"} <= set(claim)
            assert isinstance(claim["holds"], bool)
            assert all(isinstance(claim[key], str) and claim[key] for key in ("claim", "anchor"))
        for figure in data["figures"]:
            assert (out / figure["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert data["results"]["batch_norm"] == data["environment"]["batch norm layer"]
    page = (out / "index.html").read_text()
    for section in SECTIONS:
        assert f'id="{section.key}"' in page
    order = [page.index(f'id="{section.key}"') for section in SECTIONS]
    assert order == sorted(order)  # the story's order
    assert "data:image/png;base64," in page
    assert "http://" not in page
    assert "https://" not in page
    assert "<script" not in page
    assert not list(out.glob("*.tmp*"))
    lines = stdout.splitlines()
    assert lines[0].split() == ["experiment", "status", "time", "claims", "key", "numbers"]
    assert [line.split()[0] for line in lines[1 : 1 + len(names)]] == names
    assert "claims held on fashion-mnist" in stdout


@pytest.mark.slow
def test_second_run_skips_and_force_reruns(
    tmp_path: Path, lab_run: tuple[Path, str, str], tiny_data_dir: Path
) -> None:
    out, _, _ = lab_run
    for name in ("ics", "test-process"):
        (tmp_path / f"{name}.json").write_bytes((out / f"{name}.json").read_bytes())
        for png in out.glob(f"{name}-*.png"):
            (tmp_path / png.name).write_bytes(png.read_bytes())
    before = (tmp_path / "ics.json").stat().st_mtime_ns

    status, stdout, stderr = run_cli(lab_argv(tmp_path, tiny_data_dir, "ics", "test-process"))
    assert status == 0
    assert "ics: results for this configuration exist, skipped" in stderr
    assert [line.split()[1] for line in stdout.splitlines()[1:3]] == ["skipped", "skipped"]
    assert (tmp_path / "ics.json").stat().st_mtime_ns == before

    status, stdout, _ = run_cli(lab_argv(tmp_path, tiny_data_dir, "ics", "--force"))
    assert status == 0
    assert stdout.splitlines()[1].split()[:2] == ["ics", "ran"]
    # Deterministic: the forced rerun wrote the same bytes.
    assert (tmp_path / "ics.json").read_bytes() == (out / "ics.json").read_bytes()

    # Another configuration (seed) is not the same results: it runs.
    status, stdout, _ = run_cli(lab_argv(tmp_path, tiny_data_dir, "ics", "--seed", "1"))
    assert stdout.splitlines()[1].split()[:2] == ["ics", "ran"]
    assert json.loads((tmp_path / "ics.json").read_text())["config"]["seed"] == 1

    # A missing figure makes the saved results incomplete: it runs again.
    (tmp_path / "test-process-batch-size.png").unlink()
    status, stdout, _ = run_cli(lab_argv(tmp_path, tiny_data_dir, "test-process"))
    assert stdout.splitlines()[1].split()[:2] == ["test-process", "ran"]


@pytest.mark.slow
def test_report_rerenders_from_saved_results(
    tmp_path: Path, lab_run: tuple[Path, str, str]
) -> None:
    out, _, _ = lab_run
    for path in out.iterdir():
        if path.suffix in (".json", ".png"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "learning-rate-final.png").unlink()
    status, stdout, _ = run_cli(["report", str(tmp_path)])
    assert status == 0
    assert f"{len(DEFAULT)} experiments" in stdout
    page = (tmp_path / "index.html").read_text()
    assert page == (out / "index.html").read_text()
    assert (tmp_path / "learning-rate-final.png").is_file()  # redrawn from the JSON

    # Results edited by hand show up in the report: it renders from the JSON alone.
    data = json.loads((tmp_path / "ics.json").read_text())
    data["claims"][0]["measured"] = "an edited measurement <&>"
    (tmp_path / "ics.json").write_text(json.dumps(data))
    assert run_cli(["report", str(tmp_path), "--replot"])[0] == 0
    assert "an edited measurement &lt;&amp;&gt;" in (tmp_path / "index.html").read_text()


@pytest.mark.slow
def test_damaged_result_is_run_again_with_a_warning(
    tmp_path: Path, lab_run: tuple[Path, str, str], tiny_data_dir: Path
) -> None:
    out, _, _ = lab_run
    for path in out.glob("ics*"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    data = json.loads((out / "ics.json").read_text())
    (tmp_path / "ics.json").write_text(json.dumps({**data, "claims": "x"}))
    status, stdout, stderr = run_cli(lab_argv(tmp_path, tiny_data_dir, "ics"))
    assert status == 0
    assert stdout.splitlines()[1].split()[:2] == ["ics", "ran"]
    assert (
        f"bnkit lab: warning: {tmp_path / 'ics.json'}: not a usable lab result, treated as "
        "missing: 'claims' is a string, expected an array\n"
    ) in stderr
    assert (tmp_path / "ics.json").read_bytes() == (out / "ics.json").read_bytes()


@pytest.mark.slow
def test_report_leaves_out_damaged_results_with_one_warning_each(
    tmp_path: Path, lab_run: tuple[Path, str, str]
) -> None:
    out, _, _ = lab_run
    for path in out.iterdir():
        if path.suffix in (".json", ".png"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    for name, change in (("learning-rate", {"figures": ["a.png"]}), ("ics", {"config": [1]})):
        data = json.loads((out / f"{name}.json").read_text())
        (tmp_path / f"{name}.json").write_text(json.dumps({**data, **change}))
    (tmp_path / "results.json").write_text("[1, 2]")
    status, stdout, stderr = run_cli(["report", str(tmp_path)])
    assert status == 0
    assert f"{len(DEFAULT) - 2} experiments" in stdout
    lines = stderr.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("bnkit report: warning: ") for line in lines)
    assert "learning-rate.json: not a usable lab result" in stderr
    assert "figures[0] is a string, expected an object" in stderr
    assert "'config' is an array, expected an object" in stderr
    assert "the file holds an array" in stderr
    page = (tmp_path / "index.html").read_text()
    assert 'id="regularization"' in page
    assert 'id="ics"' not in page


def test_report_of_unknown_experiments_and_missing_dir(tmp_path: Path) -> None:
    result = {
        "experiment": "unknown-experiment",
        "title": "Unknown",
        "section": "not-a-section",
        "dataset": "mnist1d",
        "config": {"mode": "quick"},
        "results": {},
        "claims": [{"claim": "c", "anchor": "a", "measured": "m", "holds": True}],
        "figures": [{"file": "unknown-x.png", "caption": "gone"}],
    }
    (tmp_path / "unknown-experiment.json").write_text(json.dumps(result))
    assert run_cli(["report", str(tmp_path)])[0] == 0
    page = (tmp_path / "index.html").read_text()
    assert "Other experiments" in page
    assert "1 of 1" in page
    assert "Figure unknown-x.png is missing" in page
    status, _, stderr = run_cli(["report", str(tmp_path / "nowhere")])
    assert status == 1
    assert stderr == f"bnkit report: no such directory: {tmp_path / 'nowhere'}\n"
    status, _, stderr = run_cli(["report", str(tmp_path / "unknown-experiment.json")])
    assert status == 1
    assert stderr == f"bnkit report: not a directory: {tmp_path / 'unknown-experiment.json'}\n"


def test_missing_dataset_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIRS", ())
    monkeypatch.setenv("BNKIT_CACHE_DIR", str(tmp_path / "cache"))
    status, stdout, stderr = run_cli(
        ["lab", "ics", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path)]
    )
    assert status == 1
    assert stdout == ""
    assert stderr.startswith("bnkit lab: mnist: could not find the four IDX files")
    assert str(tmp_path) in stderr


def test_full_configuration_uses_the_published_steps() -> None:
    assert get_experiment("ics").config(full=True).steps == 50_000
    assert get_experiment("ics").config(full=False).batch_size == 60
    scaled = get_experiment("test-process").config(steps_scale=0.001)
    assert (scaled.steps, scaled.recalibration_batches) == (2, 2)  # 2000, 100 steps scaled


def test_native_code_is_ready_before_the_first_progress_bar(
    tmp_path: Path, tiny_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first build takes about a minute: it must not run under a progress bar (whose
    first step would then show that minute, and an estimate of days)."""
    from bnkit.kernels import native
    from bnkit.lab import runner

    events: list[str] = []
    library = native.library
    monkeypatch.setattr(native, "library", lambda: (events.append("native"), library())[1])

    def bars(stream: object) -> object:
        def make(total: int, desc: str) -> object:
            events.append("bar")
            return runner.no_progress(total, desc)

        return make

    monkeypatch.setattr(runner, "_tqdm_progress", bars)
    argv = lab_argv(tmp_path / "out", tiny_data_dir, "training-process")
    status, _, stderr = run_cli([arg for arg in argv if arg != "--no-progress"])
    assert status == 0, stderr
    assert "bar" in events
    assert events.index("native") < events.index("bar")
