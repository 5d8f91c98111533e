"""mkdocs hook: the settings reference (docs/reference/config.md) generated from the schema.

Every setting comes from the structured-config dataclasses of :mod:`subnets.config` (its type,
default, and the comment beside or above it in the source), every config group option from the
YAML files under ``src/subnets/configs`` (its first comment line). Nothing is written by hand, so
the page cannot fall behind the code.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import re
import typing
from pathlib import Path

MARKER = "<!-- generated: settings -->"
CONFIGS = Path(__file__).resolve().parents[2] / "src" / "subnets" / "configs"


def _comments(cls) -> dict[str, str]:
    """Field name -> the comment beside it, or the comment lines just above it, in the source."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = re.match(r"\s+(\w+): .*?(?:#\s*(.*))?$", line)
        if match and not stripped.startswith(('"""', "def ")):
            out[match.group(1)] = " ".join([*above, match.group(2) or ""]).strip()
        above = []
    return out


def _text(comment: str) -> str:
    """A comment as the text of a table cell: what HTML or Markdown would take for markup
    (``<name>`` placeholders, ``*``, ``_``, ``|``, ``[``) escaped, `code` spans kept; type
    checkers' and formatters' pragmas left out."""
    comment = re.sub(r"\s*\b(type: ignore(\[[\w-]+\])?|fmt: skip|noqa(: [\w, ]+)?)", "", comment).strip()
    parts = re.split(r"(`[^`]*`)", comment)
    return "".join(part if part.startswith("`") else re.sub(r"([*_|\[\]])", r"\\\1", html.escape(part, quote=False))
                   for part in parts)  # fmt: skip


def _type(hint) -> str:
    text = getattr(hint, "__name__", None) or str(hint)
    return text.replace("typing.", "").replace("NoneType", "None").replace(" | ", " or ")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = getattr(field.default, "value", field.default)
        return f"`{value!r}`" if value is not None else "`null`"
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        return "" if dataclasses.is_dataclass(value) else f"`{value!r}`"
    return ""


def _section(cls, prefix: str, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    comments = _comments(cls)
    rows, nested = [], []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            nested.append((hint, f"{prefix}{field.name}."))
            continue
        rows.append(f"| `{prefix}{field.name}` | {html.escape(_type(hint))} | {_default(field)} | "
                    f"{_text(comments.get(field.name, ''))} |")  # fmt: skip
    if rows:
        doc = inspect.getdoc(cls) or ""
        doc = (
            "" if doc.startswith(f"{cls.__name__}(") else doc.split("\n\n")[0].replace("\n", " ")
        )  # not the generated one
        lines += ["", f"### `{prefix.rstrip('.') or 'top level'}`", "", doc, "",
                  "| setting | type | default | what it does |", "|---|---|---|---|", *rows]  # fmt: skip
    for hint, sub in nested:
        _section(hint, sub, lines)


def _groups() -> list[str]:
    lines = ["", "## Config groups", "", "| group | option | what it is |", "|---|---|---|"]
    for folder in sorted(p for p in CONFIGS.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for path in sorted(folder.rglob("*.yaml")):
            comment = []  # the first paragraph of comment lines
            for line in path.read_text().splitlines():
                if line.startswith("#") and "@package" not in line:
                    comment.append(line.lstrip("# ").strip())
                elif comment:
                    break
            comment = _text(" ".join(comment))
            lines.append(f"| `{folder.name}` | `{path.relative_to(folder).with_suffix('')}` | {comment} |")
    return lines


def settings_reference() -> str:
    from subnets import config

    lines = ["## Settings", "", "Every setting of `python -m subnets.train` (`subnets.config.Config`), with its "
             "schema's type and default; YAML files and the command line override them."]  # fmt: skip
    _section(config.Config, "", lines)
    lines += ["", "## Task settings", "", "The `task` group's options each start from one of these schemas."]
    for name, schema in config.TASK_SCHEMAS.items():
        _section(schema, f"task ({name}).", lines)
    return "\n".join([*lines, *_groups()]) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, settings_reference())
    return markdown
