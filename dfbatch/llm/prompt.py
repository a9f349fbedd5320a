"""Prompt templates: ``"Summarize: {text}"`` where each ``{name}`` is a column of the batch.

Rendering is vectorized (one ``concat_str`` over the batch); null values render as ``""``.
Format specs and conversions (``{score:.2f}``, ``{title!r}``) are allowed and use Python's
``str.format`` row by row. Literal braces are doubled, as in ``str.format``: ``{{`` and ``}}``.

Examples
--------
>>> import polars as pl
>>> from dfbatch.llm.prompt import Template
>>> t = Template("Title: {title}\\nText: {text}")
>>> t.fields
('title', 'text')
>>> t.render(pl.DataFrame({"title": ["A", None], "text": ["x", "y"]}))
['Title: A\\nText: x', 'Title: \\nText: y']
>>> t.render(pl.DataFrame({"titel": ["A"], "text": ["x"]}))
Traceback (most recent call last):
...
dfbatch.errors.ConfigError: prompt placeholder {title} names no column ... did you mean 'titel'?
"""

from __future__ import annotations

import re
import string
from typing import Any

import polars as pl

from dfbatch.errors import ConfigError, did_you_mean

_ROOT = re.compile(r"^[^.\[]*")


class Template:
    """A ``str.format``-style template whose placeholders name columns."""

    def __init__(self, text: str, *, what: str = "prompt") -> None:
        if not isinstance(text, str):
            msg = f"{what} must be a string template like 'Summarize: {{text}}', got {text!r}"
            raise ConfigError(msg)
        self.text = text
        self.what = what
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as e:
            msg = (
                f"{what} {text!r} is not a valid template ({e}); write literal braces as {{{{ }}}}"
            )
            raise ConfigError(msg) from None
        self._parts = parts
        fields: list[str] = []
        self._simple = True
        for _, name, spec, conversion in parts:
            if name is None:
                continue
            root = _ROOT.match(name).group(0)  # type: ignore[union-attr]
            if root == "" or root.isdigit():
                msg = (
                    f"{what} placeholders must name a column, e.g. {{text}}; got {{{name}}} "
                    f"in {text!r}"
                )
                raise ConfigError(msg)
            if spec or conversion or root != name:
                self._simple = False
            if root not in fields:
                fields.append(root)
        self.fields = tuple(fields)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"

    def check(self, columns: list[str]) -> None:
        """Raise ``ConfigError`` (with a did-you-mean hint) if a placeholder names no column."""
        for name in self.fields:
            if name not in columns:
                msg = (
                    f"{self.what} placeholder {{{name}}} names no column of the batch "
                    f"(columns: {columns}).{did_you_mean(name, columns)}"
                )
                raise ConfigError(msg)

    def render(self, batch: pl.DataFrame) -> list[str]:
        """One rendered string per row of ``batch``, in order."""
        self.check(batch.columns)
        if self._simple:
            try:
                return self._render_vectorized(batch)
            except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError):
                pass  # a column that does not cast to text (struct, list ...): go row by row
        return self._render_rows(batch)

    def _render_vectorized(self, batch: pl.DataFrame) -> list[str]:
        exprs: list[pl.Expr] = []
        for literal, name, _, _ in self._parts:
            if literal:
                exprs.append(pl.lit(literal, pl.String))
            if name is not None:
                exprs.append(pl.col(name).cast(pl.String).fill_null(""))
        if not exprs:
            return [""] * batch.height
        out = batch.select(pl.concat_str(exprs).alias("_prompt")).to_series()
        return out.to_list()

    def _render_rows(self, batch: pl.DataFrame) -> list[str]:
        rows = batch.select(self.fields).iter_rows(named=True)
        return [self.text.format_map(_Blank(row)) for row in rows]


class _Blank(dict[str, Any]):
    """Row values with None rendered as ``""`` (like the vectorized path)."""

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        return "" if value is None else value
