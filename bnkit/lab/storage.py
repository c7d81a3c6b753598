"""Files the lab writes: atomically, so a killed run leaves only complete files.

Every file goes to a temporary file in the same directory first, which is flushed,
synced and then renamed over the target with :func:`os.replace` (atomic on POSIX and
Windows when both are on one file system). A reader sees the old file or the new one,
never half of one; a crash leaves at most a stray ``.tmp`` file, never a bad target.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from bnkit.errors import DamagedResultWarning

__all__ = [
    "atomic_path",
    "jsonable",
    "read_json",
    "read_result",
    "result_problem",
    "same_config",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it onto ``target`` on success.

    The caller writes the whole file to the yielded path (by name, e.g. with
    ``savefig`` or ``np.savez``); when the block ends without an exception the file is
    renamed onto ``target``, otherwise it is deleted and ``target`` is left as it was.

    Args:
        target: the file to create or replace; its directory is created if missing.
        suffix: the temporary file's ending, for writers that look at it (``".npz"``).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("complete")
        >>> target.read_text()
        'complete'
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent
    )
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are for reading
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_atomic(
    target: str | os.PathLike[str], mode: str, write: Callable[[IO[Any]], object]
) -> None:
    with (
        atomic_path(target) as tmp,
        open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f,
    ):
        write(f)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``target`` atomically (see :func:`atomic_path`)."""
    _write_atomic(target, "wb", lambda f: f.write(data))


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically (see :func:`atomic_path`)."""
    _write_atomic(target, "w", lambda f: f.write(text))


def jsonable(value: Any) -> Any:
    """``value`` in strict JSON form: tuples become lists, NaN and infinities become None.

    NumPy and torch scalars and arrays are converted by their ``tolist()``.

    Example:
        >>> jsonable({"a": (1, float("nan")), "b": [float("inf"), 0.5]})
        {'a': [1, None], 'b': [None, 0.5]}
    """
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return jsonable(tolist())
    raise TypeError(f"jsonable: cannot store a {type(value).__name__} in JSON: {value!r}")


def write_json_atomic(target: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented strict JSON (no NaN) to ``target`` atomically."""
    text = json.dumps(jsonable(data), indent=1, allow_nan=False) + "\n"
    write_text_atomic(target, text)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if the file is missing or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None
    return data if isinstance(data, dict) else None


# The structure of a saved result (what bnkit.lab.runner writes): key -> JSON type.
_REQUIRED = {"experiment": str, "config": dict, "results": dict, "claims": list, "figures": list}
_OPTIONAL = {
    "title": str,
    "section": str,
    "description": str,
    "dataset": str,
    "headline": str,
    "environment": dict,
}
_CLAIM = {"claim": str, "anchor": str, "measured": str, "holds": bool}
_FIGURE = {"file": str, "caption": str}
_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "true or false"}


def _json_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return next(name for kind, name in _JSON_NAMES.items() if isinstance(value, kind))


def _fields_problem(
    data: Mapping[str, Any], where: str, required: Mapping[str, type], optional: Mapping[str, type]
) -> str | None:
    for key, kind in {**required, **optional}.items():
        if key not in data:
            if key in required:
                return f"{where}{key!r} is missing"
        elif not isinstance(data[key], kind):
            return f"{where}{key!r} is {_json_name(data[key])}, expected {_JSON_NAMES[kind]}"
    return None


def _items_problem(items: list[Any], key: str, fields: Mapping[str, type]) -> str | None:
    for index, item in enumerate(items):
        where = f"{key}[{index}] "
        if not isinstance(item, dict):
            return f"{where}is {_json_name(item)}, expected an object"
        problem = _fields_problem(item, where, fields, {"section": str})
        if problem:
            return problem
    return None


def result_problem(data: Any, name: str) -> str | None:
    """What is wrong with ``data`` as the saved result of experiment ``name``; None if nothing.

    A result is an object with ``experiment`` (equal to ``name``), ``config`` and
    ``results`` (objects), ``claims`` (objects with the strings ``claim``, ``anchor``,
    ``measured`` and the boolean ``holds``) and ``figures`` (objects with the strings
    ``file``, a plain file name, and ``caption``); ``title``, ``section``,
    ``description``, ``dataset``, ``headline`` (strings) and ``environment`` (an
    object) may be missing but have those types when present.

    Example:
        >>> result_problem({"experiment": "ics", "config": {}, "results": {},
        ...                 "claims": "x", "figures": []}, "ics")
        "'claims' is a string, expected an array"
    """
    if not isinstance(data, dict):
        return f"the file holds {_json_name(data)}, expected an object"
    problem = _fields_problem(data, "", _REQUIRED, _OPTIONAL)
    if problem:
        return problem
    if data["experiment"] != name:
        return f"'experiment' is {data['experiment']!r}, expected {name!r} (the file's name)"
    problem = _items_problem(data["claims"], "claims", _CLAIM) or _items_problem(
        data["figures"], "figures", _FIGURE
    )
    if problem:
        return problem
    for index, figure in enumerate(data["figures"]):
        file = figure["file"]
        if file in ("", ".", "..") or Path(file).name != file:
            return f"figures[{index}] 'file' is {file!r}, expected a file name without a directory"
    return None


def read_result(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The lab result saved in ``path`` (``<experiment>.json``), or None if there is none.

    The one place where saved results are loaded: what it returns has the structure
    :func:`result_problem` describes, so its users need not check types. A missing file
    is None; a file that cannot be read, is not JSON or has the wrong structure is None
    as well, with a :class:`~bnkit.errors.DamagedResultWarning` that names the file and
    what is wrong with it.
    """
    path = Path(path)
    problem: str | None
    try:
        with open(path, encoding="utf-8") as f:
            data: Any = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as error:
        problem = f"cannot read it as JSON ({error})"
    else:
        problem = result_problem(data, path.stem)
        if problem is None:
            return dict(data)
    warnings.warn(
        f"{path}: not a usable lab result, treated as missing: {problem}",
        DamagedResultWarning,
        stacklevel=2,
    )
    return None


def same_config(stored: Any, current: Mapping[str, Any]) -> bool:
    """Whether a stored configuration equals ``current`` once both are in JSON form.

    Example:
        >>> same_config({"hidden": [100, 100]}, {"hidden": (100, 100)})
        True
    """
    return bool(jsonable(stored) == jsonable(current))
