"""The command line's edges: fast plain-text help, one-line errors, Ctrl-C, torchrun examples."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bnkit import _cli
from bnkit.__main__ import main
from bnkit.bench import cli as bench_cli

ROOT = Path(__file__).resolve().parents[2]


def python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
        cwd=ROOT,
    )


# Prints the help of `bnkit ARGS...` and, on the last line, whether torch was imported.
HELP_PROGRAM = """
import sys
from bnkit.__main__ import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert exit.code == 0, exit.code
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize(
    "command", [["--help"], ["bench", "--help"], ["lab", "--help"], ["report", "--help"]]
)
def test_help_imports_no_torch_and_shows_plain_text(command: list[str]) -> None:
    result = python("-c", HELP_PROGRAM, *command)
    assert result.returncode == 0, result.stderr
    *help_lines, last = result.stdout.splitlines()
    assert last == "torch imported: False"
    text = "\n".join(help_lines)
    assert text.startswith("usage: bnkit")
    for markup in ("``", ":mod:", ":class:", ":func:", ":data:"):
        assert markup not in text, f"{markup} in the help of bnkit {' '.join(command)}"


def test_bench_help_keeps_its_text_without_markup() -> None:
    result = python("-m", "bnkit.bench", "--help")
    assert result.returncode == 0, result.stderr
    assert "THP_MEM_ALLOC_ENABLE=1" in result.stdout  # a ``literal`` of the docstring
    assert "see bnkit.bench.speed for the method" in result.stdout  # a :mod: role
    assert "``" not in result.stdout


def test_bench_choices_match_the_benchmark() -> None:
    from bnkit.bench import speed

    assert tuple(speed.DTYPES) == bench_cli._DTYPE_NAMES
    assert bench_cli._OPERATIONS == speed.OPERATIONS


@pytest.mark.parametrize("value", ["-1", "0", "many"])
def test_bench_rejects_bad_repetitions_in_one_line(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["bench", "--repetitions", value])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "argument --repetitions: expected" in error
    assert error.strip().splitlines()[-1].startswith("bnkit bench: error:")


def test_bench_refuses_an_unwritable_json_path_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for path in (tmp_path / "missing" / "bench.json", tmp_path):
        assert main(["bench", "--quick", "--json", str(path)]) == 1
        out, error = capsys.readouterr()
        assert out == ""  # nothing was measured
        assert error.count("\n") == 1, error
        assert error.startswith(f"bnkit bench: cannot write --json {path}: ")


def test_unwritable_reasons(tmp_path: Path) -> None:
    assert bench_cli._unwritable(str(tmp_path / "new.json")) is None
    missing = tmp_path / "no"
    assert bench_cli._unwritable(str(missing / "new.json")) == f"no folder {missing}"
    assert bench_cli._unwritable(str(tmp_path)) == "it is a folder"


@pytest.mark.slow
def test_a_missing_extra_is_one_line_naming_the_install(tmp_path: Path) -> None:
    # tqdm draws the lab's progress bars; None in sys.modules makes its import fail as if
    # it were not installed.
    program = (
        "import sys; sys.modules['tqdm'] = None\n"
        "from bnkit.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    out = tmp_path / "lab"
    result = python(
        "-c", program, "lab", "ics", "--dataset", "digits", "--steps-scale", "0.001",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "tqdm" in result.stderr
    assert "pip install 'bnkit[lab]'" in result.stderr


def test_a_missing_extra_anywhere_under_the_command_line_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def command() -> int:
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib.pyplot")

    assert _cli.run("bnkit", command) == 1
    assert capsys.readouterr().err == (
        "bnkit: this command needs matplotlib, which is not installed: pip install 'bnkit[lab]'\n"
    )


@pytest.mark.parametrize("module", sorted(_cli.OPTIONAL_MODULES))
def test_each_optional_module_maps_to_the_lab_extra(module: str) -> None:
    error = ModuleNotFoundError(f"No module named {module!r}", name=f"{module}.sub")
    assert _cli.missing_extra(error) == (
        f"this command needs {module}, which is not installed: pip install 'bnkit[lab]'"
    )


def test_other_missing_modules_keep_their_traceback() -> None:
    def command() -> int:
        raise ModuleNotFoundError("No module named 'nowhere'", name="nowhere")

    with pytest.raises(ModuleNotFoundError, match="nowhere"):
        _cli.run("bnkit", command)


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path) -> None:
    # The report command, replaced by one that receives SIGINT as Ctrl-C sends it. Python
    # keeps SIGINT ignored when it starts ignored (a background job), so the program
    # restores the handler a terminal's Python has.
    program = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import bnkit.lab.cli\n"
        "def interrupted(args):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(10)\n"
        "    return 0\n"
        "bnkit.lab.cli.report_command = interrupted\n"
        "from bnkit.__main__ import main\n"
        "sys.exit(main(['report', sys.argv[1]]))"
    )
    result = python("-c", program, str(tmp_path))
    assert result.returncode == 130 == 128 + signal.SIGINT
    assert result.stderr == "bnkit: interrupted\n"


@pytest.mark.slow
def test_sync_example_says_it_needs_torchrun() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = python("examples/sync_cpu.py", env=env)
    assert result.returncode != 0
    assert "needs torchrun" in result.stderr
    assert "torchrun --standalone --nproc-per-node 2 examples/sync_cpu.py" in result.stderr
    assert "Traceback" not in result.stderr
