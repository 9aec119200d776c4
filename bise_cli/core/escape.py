"""Escaping of user-controlled text, one helper per output format: Markdown (model card, report, `bise table`),
LaTeX (`bise table`'s .tex), rich console markup (terminal tables) and matplotlib labels.

Class names, bias values, attribute and column names, record_keys, notes and paths come from the user's data
and command line. Written raw, `<script>` reaches a Markdown renderer as HTML, `|` shifts a table's columns, a
newline ends a heading or a list item, `$...$` becomes math, `[bold]` is eaten by rich and `\\` or `&` breaks a
LaTeX table. Every such value goes through the helper of the format it is written in; the text bise writes
itself (headings, units, numbers) does not.
"""

from __future__ import annotations

import re

# Line breaks and other control characters (Unicode line and paragraph separators included) become one space:
# a value always stays on its line (a heading, a list item, a table row, a LaTeX comment).
_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")
# ASCII punctuation with a meaning inline in CommonMark/GFM (emphasis, code, tables, strikethrough, GitHub's
# $math$); a backslash escapes each, and the rendered text shows the character. An underscore between two letters
# or digits never starts emphasis (CommonMark's intraword rule), so `acc_unbiased` stays as it is. A bracket makes
# a link only as `[text](url)` or `[text][ref]` (bise writes no link definitions), so only a `]` followed by `(`
# or `[` is escaped and `[45.0, 55.0]` stays as it is.
_MARKDOWN_PUNCTUATION = re.compile(r"[\\`*|~$]|\](?=[(\[])|_(?![^\W_])|(?<![^\W_])_")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
          ">": r"\textgreater{}", "|": r"\textbar{}"}
_LATEX_SPECIAL = re.compile("|".join(map(re.escape, _LATEX)))


def one_line(value) -> str:
    """`str(value)` with line breaks and control characters replaced by one space."""
    return _BREAKS.sub(" ", str(value))


def markdown(value, code: bool = False) -> str:
    """`value` as literal Markdown text: HTML-escaped (`&lt;script&gt;`), inline syntax backslash-escaped (`a\\|b`
    keeps a table's columns), on one line. `code=True` gives an inline code span instead (shown verbatim; its
    fence is longer than any backtick run inside). Code spans are for lines outside tables: GFM splits table
    cells at `|` even inside a code span."""
    text = one_line(value)
    if code:
        fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
        pad = " " if text.startswith("`") or text.endswith("`") else ""
        return f"{fence}{pad}{text}{pad}{fence}"
    text = _MARKDOWN_PUNCTUATION.sub(lambda match: "\\" + match.group(0), text)
    return "".join(_HTML.get(char, char) for char in text)


def latex(value) -> str:
    """`value` as literal LaTeX text (every special character escaped, on one line)."""
    return _LATEX_SPECIAL.sub(lambda match: _LATEX[match.group(0)], one_line(value))


def console(value) -> str:
    """`value` for a rich console or table: `[` is escaped so rich prints it instead of reading markup."""
    from rich.markup import escape

    return escape(one_line(value))


def plot_label(value) -> str:
    """`value` for a matplotlib label: `$` escaped (matplotlib reads `$...$` as mathtext), on one line."""
    return one_line(value).replace("$", r"\$")
