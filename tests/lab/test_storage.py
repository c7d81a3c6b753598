"""Atomic writes: a target holds the old complete file or the new one, never a part."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from bnkit.errors import DamagedResultWarning
from bnkit.lab import storage
from bnkit.lab.storage import (
    atomic_path,
    jsonable,
    read_json,
    read_result,
    result_problem,
    same_config,
    write_json_atomic,
    write_text_atomic,
)


def test_write_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "result.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2, "b": (1.5, math.nan)})
    assert json.loads(target.read_text()) == {"a": 2, "b": [1.5, None]}
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def test_failure_while_writing_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    write_text_atomic(target, "old, complete")

    def interrupted_write() -> None:
        with atomic_path(target) as tmp:
            tmp.write_text("new, half writ")
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        interrupted_write()
    assert target.read_text() == "old, complete"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_crash_before_the_rename_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ics.json"
    write_json_atomic(target, {"run": 1})

    def crash(source: object, destination: object) -> None:
        raise KeyboardInterrupt  # the process is stopped between writing and renaming

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(target, {"run": 2})
    monkeypatch.undo()
    assert read_json(target) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ics.json"]


def test_json_is_strict(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    write_json_atomic(target, {"inf": math.inf, "nested": {"values": [math.nan, 1]}})
    text = target.read_text()
    assert "NaN" not in text
    assert "Infinity" not in text
    with pytest.raises(TypeError, match="cannot store a object"):
        jsonable({"bad": object()})


def test_read_json_tolerates_missing_and_damaged_files(tmp_path: Path) -> None:
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "cut.json").write_text('{"experiment": "ics", "res')
    assert read_json(tmp_path / "cut.json") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(tmp_path / "list.json") is None


def test_same_config_compares_json_forms() -> None:
    assert same_config({"hidden": [100, 100], "lr": 0.1}, {"hidden": (100, 100), "lr": 0.1})
    assert not same_config({"hidden": [100]}, {"hidden": (100, 100)})
    assert not same_config(None, {"a": 1})


def test_numpy_values_become_plain_json() -> None:
    import numpy as np

    assert jsonable({"a": np.float32(0.5), "b": np.arange(3), "c": np.int64(4)}) == {
        "a": 0.5,
        "b": [0, 1, 2],
        "c": 4,
    }
    assert storage.jsonable(np.float64(math.nan)) is None


def good_result() -> dict[str, object]:
    return {
        "experiment": "ics",
        "title": "Internal covariate shift",
        "config": {"seed": 0},
        "results": {"batch_norm": "bnkit"},
        "claims": [{"claim": "c", "anchor": "a", "measured": "m", "holds": True}],
        "figures": [{"file": "ics-drift.png", "caption": "drift", "section": "other"}],
    }


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"claims": "x"}, "'claims' is a string, expected an array"),
        ({"figures": ["a.png"]}, "figures[0] is a string, expected an object"),
        ({"results": None}, "'results' is null, expected an object"),
        ({"config": [1, 2]}, "'config' is an array, expected an object"),
        ({"experiment": 3}, "'experiment' is a number, expected a string"),
        ({"experiment": "memory"}, "'experiment' is 'memory', expected 'ics'"),
        ({"title": ["t"]}, "'title' is an array, expected a string"),
        ({"environment": "cpu"}, "'environment' is a string, expected an object"),
        ({"claims": [{"claim": "c", "anchor": "a", "measured": "m"}]}, "'holds' is missing"),
        (
            {"claims": [{"claim": "c", "anchor": "a", "measured": "m", "holds": 1}]},
            "claims[0] 'holds' is a number, expected true or false",
        ),
        ({"figures": [{"file": "a.png"}]}, "figures[0] 'caption' is missing"),
        (
            {"figures": [{"file": "../../etc/passwd", "caption": "c"}]},
            "expected a file name without a directory",
        ),
        ({"figures": [{"file": "..", "caption": "c"}]}, "without a directory"),
    ],
)
def test_result_of_the_wrong_structure_is_missing_with_a_warning(
    tmp_path: Path, change: dict[str, object], problem: str
) -> None:
    path = tmp_path / "ics.json"
    path.write_text(json.dumps(good_result()))
    assert read_result(path) == good_result()
    path.write_text(json.dumps({**good_result(), **change}))
    with pytest.warns(DamagedResultWarning, match="treated as missing") as record:
        assert read_result(path) is None
    message = str(record[0].message)
    assert message.startswith(f"{path}: ")
    assert problem in message


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"experiment": "ics", "res', "cannot read it as JSON"),
        ("[1, 2]", "the file holds an array, expected an object"),
        ("[" * 100_000, "cannot read it as JSON"),
        ("", "cannot read it as JSON"),
    ],
)
def test_unreadable_result_is_missing_with_a_warning(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "ics.json"
    path.write_text(text)
    with pytest.warns(DamagedResultWarning, match=problem):
        assert read_result(path) is None


def test_missing_result_is_none_without_a_warning(tmp_path: Path) -> None:
    assert read_result(tmp_path / "ics.json") is None  # filterwarnings=error: no warning
    result = {**good_result(), "results": {}, "claims": [], "figures": []}
    assert result_problem(result, "ics") is None
