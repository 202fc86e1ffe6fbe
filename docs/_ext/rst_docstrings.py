"""Griffe extension: render mechunlearn's Google-style docstrings, written with a few
reStructuredText habits, as mkdocstrings Markdown, without editing the source.

What it rewrites (in memory, once the package is loaded):

* ``Example:`` (singular) becomes ``Examples:``, so that griffe parses the ``>>>`` lines as an
  examples section (code blocks) instead of an admonition full of ``>`` block quotes.
* Sphinx roles (``:func:`x```, ``:class:`~a.b.C```, ``:meth:``, ``:mod:``, ``:data:``,
  ``:attr:``) become optional cross-references: a link when the target is rendered on the
  site, plain code otherwise (``optional`` autorefs never fail ``mkdocs build --strict``).
  Targets are resolved like Sphinx does: absolute, relative (``.base``), or by name in the
  enclosing class, module and package.
* Simple two-column RST tables (``=====  =====`` borders) become Markdown tables.
* A paragraph ending in ``::`` (RST literal block marker) ends in ``:`` instead; the indented
  block after it is already a Markdown code block.
* Doctest directives (``# doctest: +SKIP`` at the end of an example line, for ``make
  doctest``) are dropped from the rendered examples.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`(~?)([\w.]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_LITERAL = re.compile(r"(\S)::$", re.MULTILINE)
_BORDER = re.compile(r"^(\s*)(=+)(\s+)(=+)\s*$")
_DIRECTIVE = re.compile(r"[ \t]*#\s*doctest:[^\n]*$", re.MULTILINE)


def _resolve(obj: griffe.Object, name: str, loader: griffe.GriffeLoader) -> str | None:
    """Canonical path of the object that ``name`` refers to from ``obj``'s docstring."""
    candidates: list[str] = []
    if name.startswith("."):
        package = obj.module.path if obj.module.is_init_module else obj.module.parent.path
        candidates.append(package + name)
    elif name.split(".")[0] == obj.package.name:
        candidates.append(name)
    else:
        scope: Any = obj
        while scope is not None:
            if not scope.is_function:
                candidates.append(f"{scope.path}.{name}")
            scope = scope.parent
    for path in candidates:
        try:
            target = loader.modules_collection[path]
            if target.is_alias:
                target = target.final_target
        except Exception:  # noqa: BLE001 (not found, or an alias that does not resolve)
            continue
        if target.name.startswith("_") and not target.is_module:
            return None  # private: not rendered (filters: ["!^_"])
        return target.path
    return None


def _roles(text: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str:
    def replace(match: re.Match) -> str:
        tilde, name = match.groups()
        shown = name.split(".")[-1] if tilde else name.lstrip(".")
        path = _resolve(obj, name, loader)
        code = f"<code>{html.escape(shown)}</code>"
        if path is None:
            return code
        return f'<autoref identifier="{path}" optional>{code}</autoref>'

    return _ROLE.sub(replace, text)


def _cell(text: str) -> str:
    return text.replace("|", "&#124;")


def _tables(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        top = _BORDER.match(lines[i])
        end = None
        if top:
            end = next((j for j in range(i + 1, len(lines)) if _BORDER.match(lines[j])), None)
        if top is None or end is None:
            out.append(lines[i])
            i += 1
            continue
        indent = len(top.group(1))
        split = indent + len(top.group(2)) + len(top.group(3))
        rows: list[list[str]] = []
        for line in lines[i + 1 : end]:
            first, second = line[indent:split].strip(), line[split:].strip()
            if not first and rows:  # continuation of the previous row's second column
                rows[-1][1] += " " + second
            elif first or second:
                rows.append([first, second])
        pad = " " * indent
        out.append("")
        out.append(f"{pad}| | |")
        out.append(f"{pad}|---|---|")
        out.extend(f"{pad}| {_cell(a)} | {_cell(b)} |" for a, b in rows)
        out.append("")
        i = end + 1
    return "\n".join(out)


def rewrite(text: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str:
    """The docstring ``text`` of ``obj`` in the Markdown dialect the site renders."""
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _LITERAL.sub(r"\1:", text)
    text = _DIRECTIVE.sub("", text)
    text = _tables(text)
    return _roles(text, obj, loader)


class RstDocstrings(griffe.Extension):
    """Rewrite every docstring of the loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        seen: set[int] = set()

        def visit(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj.docstring.value, obj, loader)
                obj.docstring.__dict__.pop("parsed", None)  # parse the new text
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
