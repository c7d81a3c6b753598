"""What bnkit's command lines share: plain-text help and one-line errors for what a user can fix.

Importing this module is cheap (standard library only), so that ``bnkit --help`` answers
without loading torch.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

__all__ = ["OPTIONAL_MODULES", "PlainParser", "missing_extra", "plain", "run"]

#: Optional modules that some commands import -> the extra of bnkit that installs them.
OPTIONAL_MODULES = {"matplotlib": "lab", "tqdm": "lab", "mnist1d": "lab", "sklearn": "lab"}

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :mod:`x`, :class:`~x.y`
_LITERAL = re.compile(r"``([^`]+)``")


def plain(text: str) -> str:
    """The text without reST markup, for a terminal.

    Example:
        >>> plain("see :mod:`bnkit.bench.speed`, :class:`~bnkit.Renorm` and ``--quick``")
        'see bnkit.bench.speed, bnkit.Renorm and --quick'
    """
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


class PlainParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose help and usage are plain text (docstrings hold reST).

    Subparsers made with ``add_subparsers`` are of the same class, so they print plain
    text too.
    """

    def format_help(self) -> str:
        return plain(super().format_help())

    def format_usage(self) -> str:
        return plain(super().format_usage())


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The one-line message for a missing optional module; None for any other module.

    Example:
        >>> missing_extra(ModuleNotFoundError("No module named 'sklearn'", name="sklearn.datasets"))
        "this command needs sklearn, which is not installed: pip install 'bnkit[lab]'"
        >>> missing_extra(ModuleNotFoundError("No module named 'nothing'", name="nothing")) is None
        True
    """
    module = (error.name or "").partition(".")[0]
    extra = OPTIONAL_MODULES.get(module)
    if extra is None:
        return None
    return f"this command needs {module}, which is not installed: pip install 'bnkit[{extra}]'"


def run(prog: str, command: Callable[[], int]) -> int:
    """Call ``command`` and return its exit status; what a user can fix becomes one line.

    Ctrl-C prints ``PROG: interrupted`` and returns 130 (the shell's code for SIGINT); a
    missing optional module (see :data:`OPTIONAL_MODULES`) prints the ``pip install`` that
    brings it and returns 1. Any other error propagates with its traceback.
    """
    try:
        return command()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as error:
        message = missing_extra(error)
        if message is None:
            raise
        print(f"{prog}: {message}", file=sys.stderr)
        return 1
