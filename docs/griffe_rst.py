"""A griffe extension for the API reference: the packages' docstrings use a few reStructuredText
constructs that Markdown does not know. Roles (``:func:`x```, ``:math:`x```) become inline code, and
``.. math::`` blocks become code blocks, so that the rendered pages show the formulas as written."""

from __future__ import annotations

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


class RestructuredText(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value).rstrip("\n")

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self.on_object(obj=pkg)  # a package's own docstring
