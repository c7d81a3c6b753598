"""The documentation's examples run as written and print what the pages say they print.

Each page's Python blocks run in order in one fresh interpreter (later blocks use what
earlier ones defined); a ``text`` block right after a Python block (with at most the
word "prints" between them) is that block's expected output.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
FENCE = re.compile(r"^```(python|text)\n(.*?)^```\n", flags=re.DOTALL | re.MULTILINE)
MARK = "----- next block -----"


def examples(page: Path) -> list[tuple[str, str | None]]:
    """(code, expected output or None) for each Python block of a page."""
    text = page.read_text()
    found: list[tuple[str, str | None]] = []
    end = 0
    for match in FENCE.finditer(text):
        kind, body = match.groups()
        between = text[end : match.start()].strip()
        if kind == "python":
            found.append((body, None))
        elif found and found[-1][1] is None and between in ("", "prints"):
            found[-1] = (found[-1][0], body)
        end = match.end()
    return found


PAGES = sorted(p for p in DOCS.rglob("*.md") if examples(p))


def test_pages_with_examples_are_found() -> None:
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert {"getting-started.md", "tutorial.md", "how-to/tools.md"} <= names


def test_an_output_block_belongs_to_the_code_before_it() -> None:
    page = DOCS / "tutorial.md"
    blocks = examples(page)
    assert blocks[0][1] == "[4.] [2.5] [1.5811]\n"
    assert all(expected is not None for _, expected in blocks)


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
@pytest.mark.slow
def test_page_examples_run_and_print_what_the_page_shows(page: Path, tmp_path: Path) -> None:
    blocks = examples(page)
    program = "\n".join(f"print({MARK!r}, flush=True)\n{code}" for code, _ in blocks)
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    outputs = result.stdout.split(MARK + "\n")[1:]
    assert len(outputs) == len(blocks)
    for number, ((code, expected), output) in enumerate(zip(blocks, outputs, strict=True)):
        if expected is not None:
            got = [line.rstrip() for line in output.splitlines()]
            want = [line.rstrip() for line in expected.splitlines()]
            assert got == want, f"block {number + 1} of {page.name}:\n{code}"
