"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples() -> None:
    assert BLOCKS


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(block: str) -> None:
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})


def test_readme_starts_with_the_two_commands_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    commands = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert commands is not None
    lines = [line for line in commands.group(1).splitlines() if not line.startswith("#")]
    assert len(lines) == 2
    for line in lines:
        assert line in ci.splitlines(), f"CI does not run the README's command: {line}"
