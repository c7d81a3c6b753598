"""A griffe extension: docstrings written with reST inline markup, rendered as Markdown.

bnkit's docstrings follow the Google style, with a few reST habits that Python's help()
shows well: ``double backticks`` for literals, roles such as :class:`~bnkit.Renorm`, a
"::" that opens a literal block and ".. math::" directives. The API pages are Markdown,
so this turns them into code spans and plain code blocks. A section titled "Example:"
becomes "Examples:", the title the Google style parser knows, so that its doctests
render as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
_DIRECTIVE = re.compile(r"^\s*\.\. [a-z]+::\s*$", flags=re.MULTILINE)
_OPENS_BLOCK = re.compile(r"(?<=\S)::$", flags=re.MULTILINE)
_EXAMPLE = re.compile(r"^(\s*)Example:$", flags=re.MULTILINE)


def to_markdown(text: str) -> str:
    text = _ROLE.sub(r"`\1`", text)
    text = _LITERAL.sub(r"`\1`", text)
    text = _DIRECTIVE.sub("", text)
    text = _EXAMPLE.sub(r"\1Examples:", text)
    return _OPENS_BLOCK.sub(":", text)


class RestRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
