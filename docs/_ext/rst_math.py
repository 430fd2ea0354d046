"""Griffe extension: render the docstrings' reStructuredText math on the mkdocs API page.

The docstrings use Sphinx-style ``:math:`x``` roles and ``.. math::`` blocks (readable in
``help()`` and IDEs); mkdocstrings renders Markdown, where arithmatex expects ``\\(x\\)`` and
``\\[x\\]``. The conversion happens at docs-build time only; the source docstrings are unchanged.
"""

from __future__ import annotations

import re
import textwrap

import griffe

_ROLE = re.compile(r":math:`([^`]+)`")
_BLOCK_START = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<inline>.*)$")


def convert(text: str) -> str:
    """Rewrite ``:math:`` roles as inline math and ``.. math::`` blocks as display math."""
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        match = _BLOCK_START.match(lines[index])
        if not match:
            out.append(lines[index])
            index += 1
            continue
        indent = match.group("indent")
        body = [match.group("inline")] if match.group("inline").strip() else []
        index += 1
        while index < len(lines) and (
            not lines[index].strip() or len(lines[index]) - len(lines[index].lstrip()) > len(indent)
        ):
            body.append(lines[index])
            index += 1
        math = textwrap.dedent("\n".join(body)).strip()
        out.extend([indent + "\\[", *(indent + line for line in math.split("\n")), indent + "\\]", ""])
    # Roles may wrap across lines, so they are rewritten in the joined text.
    return _ROLE.sub(lambda m: f"\\({m.group(1)}\\)", "\n".join(out))


class RstMath(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
