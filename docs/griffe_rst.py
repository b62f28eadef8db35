"""A griffe extension for the API reference, which reads the packages' sources without importing them.

The docstrings use a few reStructuredText constructs that Markdown does not know: roles (``:func:`x```,
``:math:`x```) become inline code, and ``.. math::`` blocks become code blocks, so that the rendered pages
show the formulas as written. The focal family's functions share part of their Args and Returns: at import,
``_shared_doc`` puts the module's ``_SHARED_ARGS`` and ``_SHARED_RETURNS`` in place of the ``<shared-args>``
and ``<shared-returns>`` lines; the same is done here from the source."""

from __future__ import annotations

import ast
import re
import textwrap
from typing import Any

import griffe

ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|obj|exc|math):`~?([^`]+)`")
MATH = re.compile(r"^([ \t]*)\.\. math::[ \t]*\n((?:\1[ \t]+\S.*\n|[ \t]*\n)+)", flags=re.M)


def markdown(text: str) -> str:
    """``text`` with the roles as inline code and each math block as a fenced code block."""

    def block(match: re.Match[str]) -> str:
        indent, body = match.group(1), textwrap.dedent(match.group(2)).strip("\n")
        fenced = "```text\n" + body + "\n```\n\n"
        return textwrap.indent(fenced, indent, lambda line: bool(line.strip()))

    return MATH.sub(block, ROLE.sub(r"`\1`", text if text.endswith("\n") else text + "\n"))


def _shared(obj: griffe.Object, name: str) -> str:
    """The module constant ``name`` of ``obj``'s module, dedented by the docstrings' own indent (4)."""
    text = ast.literal_eval(str(obj.module.members[name].value)).strip("\n")
    return "\n".join(line[4:] for line in text.split("\n"))


def fill_shared(obj: griffe.Object, text: str) -> str:
    for placeholder, name in (("  <shared-args>", "_SHARED_ARGS"), ("<shared-returns>", "_SHARED_RETURNS")):
        if re.search(rf"^{placeholder}$", text, flags=re.M):
            value = _shared(obj, name)
            text = re.sub(rf"^{placeholder}$", lambda _, value=value: value, text, flags=re.M)
    return text


class RestructuredText(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(fill_shared(obj, obj.docstring.value)).rstrip("\n")

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self.on_object(obj=pkg)  # a package's own docstring
