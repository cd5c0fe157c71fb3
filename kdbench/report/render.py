"""Rendering a report (sections of tables and figures) to Markdown, one self-contained HTML page, and CSV.

Markdown tables are padded to column width and split into several tables (first column repeated)
when wider than ``width`` characters, and notes are wrapped, so every line fits a 100-column
terminal. The HTML page embeds its CSS and every figure as a ``data:image/png;base64`` URI, links to
nothing outside itself and runs no script, so it renders offline and prints to PDF. In both formats a
section's notes that every one of its tables shares (data, decoding, seeds, judge) are printed once, in
the section's note block; each table keeps only the notes that are its own. A table wider than the page
scrolls inside its box.
"""

from __future__ import annotations

import base64
import html
import textwrap
from dataclasses import dataclass, field

from kdbench.report.plots import Figure
from kdbench.report.tables import Table

MARKDOWN_WIDTH = 100


@dataclass
class Section:
    id: str
    title: str
    intro: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    figures_after: int | None = None  # HTML: the figures follow this many tables (None: all of them)

    def shared_notes(self) -> list[str]:
        """The notes every table of the section has (printed once, in the section's note block)."""
        if len(self.tables) < 2:
            return []
        return [note for note in self.tables[0].notes if all(note in t.notes for t in self.tables[1:])]


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def wrap(text: str, width: int = MARKDOWN_WIDTH, indent: str = "") -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=" " * len(indent),
                         break_long_words=True, break_on_hyphens=False) or [""]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def table_markdown(table: Table, width: int = MARKDOWN_WIDTH) -> list[str]:
    """Lines of ``table`` as padded pipe tables, split by columns to fit ``width``."""
    texts = [[_md_escape(c.title) for c in table.columns]]
    for row in table.rows:
        texts.append([f"**{_md_escape(c.text)}**" if c.best else _md_escape(c.text) for c in row])
    widths = [max(3, *(len(r[i]) for r in texts)) for i in range(len(table.columns))]
    groups: list[list[int]] = []
    current = [0]
    used = widths[0] + 4
    for index in range(1, len(widths)):
        if used + widths[index] + 3 > width and len(current) > 1:
            groups.append(current)
            current, used = [0], widths[0] + 4
        current.append(index)
        used += widths[index] + 3
    groups.append(current)
    lines: list[str] = []
    for group_index, group in enumerate(groups):
        if group_index:
            lines.append("")
        for r, row in enumerate(texts):
            cells = []
            for i in group:
                align = table.columns[i].align
                cells.append(row[i].ljust(widths[i]) if align == "left" else row[i].rjust(widths[i]))
            lines.append("| " + " | ".join(cells) + " |")
            if r == 0:
                rule = []
                for i in group:
                    dashes = "-" * widths[i]
                    rule.append(":" + dashes[1:] if table.columns[i].align == "left" else dashes[:-1] + ":")
                lines.append("| " + " | ".join(rule) + " |")
    return lines


def report_markdown(title: str, intro: list[str], sections: list[Section], width: int = MARKDOWN_WIDTH,
                    figure_note: str | None = None) -> str:
    lines = [f"# {title}", ""]
    for paragraph in intro:
        lines += wrap(paragraph, width) + [""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.intro:
            lines += wrap(paragraph, width) + [""]
        # notes every table of the section shares (data, decoding, seeds) are printed once, above them
        shared = section.shared_notes()
        if shared:
            lines += ["For every table of this section:"]
            for note in shared:
                lines += wrap(note, width, indent="- ")
            lines.append("")
        for table in section.tables:
            lines += wrap(f"### {table.title}", width) + [""]
            lines += table_markdown(table, width) + [""]
            own = [note for note in table.notes if note not in shared]
            for note in own:
                lines += wrap(note, width, indent="- ")
            if own:
                lines.append("")
        if section.figures and figure_note:
            names = ", ".join(f.title for f in section.figures)
            lines += wrap(f"Figures ({figure_note}): {names}.", width) + [""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1d2430; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2.4rem; border-bottom: 2px solid #d8dee8; padding-bottom: .2rem; }
h3 { font-size: 1.05rem; margin: 1.6rem 0 .4rem; }
div.table-wrap { max-width: 100%; overflow-x: auto; margin: .3rem 0; }
table.kd { border-collapse: collapse; font-size: .88rem; margin: 0; }
table.kd th, table.kd td { border: 1px solid #d8dee8; padding: .25rem .55rem; white-space: nowrap; }
table.kd th { background: #f1f4f9; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: 700; background: #eaf6ea; }
td.v-better { color: #116b1e; font-weight: 600; } td.v-worse { color: #a31515; font-weight: 600; }
td.v-tie { color: #5b6472; } td.v-baseline { color: #5b6472; font-style: italic; }
ul.notes { font-size: .8rem; color: #4a5361; margin: .2rem 0 1rem; padding-left: 1.2rem; }
div.note-block { background: #f6f8fb; border-left: 3px solid #9fb3c8; padding: .4rem .8rem; margin: .6rem 0 1rem; }
div.note-block p { margin: 0 0 .2rem; font-size: .82rem; font-weight: 600; color: #333c4a; }
div.note-block ul.notes { margin-bottom: .2rem; }
div.figures { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
figure { margin: .6rem 0; flex: 0 1 580px; } figure img { max-width: 100%; border: 1px solid #e3e7ee; }
figcaption { font-size: .8rem; color: #4a5361; }
nav ul { columns: 2; font-size: .9rem; } .intro { color: #333c4a; }
@media print {
  body { max-width: none; margin: 0; font-size: 10pt; } nav { display: none; }
  div.table-wrap { overflow: visible; } table.kd { font-size: 7.5pt; } table.kd th, table.kd td { white-space: normal; }
  figure, table.kd, div.note-block { break-inside: avoid; } h2 { break-after: avoid; }
}
"""


def _table_html(table: Table, shared: list[str] = ()) -> str:
    e = html.escape
    head = "".join(f'<th class="{"num" if c.align == "right" else "txt"}">{e(c.title)}</th>' for c in table.columns)
    body = []
    for row in table.rows:
        cells = []
        for column, c in zip(table.columns, row):
            classes = ["num" if column.align == "right" else "txt"]
            if c.best:
                classes.append("best")
            if c.kind:
                classes.append(f"v-{c.kind}")
            cells.append(f'<td class="{" ".join(classes)}">{e(c.text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<li>{e(note)}</li>" for note in table.notes if note not in shared)
    return (f'<h3 id="h-{e(table.id)}">{e(table.title)}</h3>\n<div class="table-wrap">'
            f'<table class="kd" id="{e(table.id)}"><thead><tr>{head}</tr></thead>\n<tbody>' + "\n".join(body)
            + "</tbody></table></div>\n" + (f'<ul class="notes">{notes}</ul>\n' if notes else ""))


def _figure_html(figure: Figure) -> str:
    e = html.escape
    data = base64.b64encode(figure.png).decode("ascii")
    return (f'<figure id="{e(figure.id)}"><img alt="{e(figure.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{e(figure.caption)}</figcaption></figure>\n")


def report_html(title: str, intro: list[str], sections: list[Section]) -> str:
    e = html.escape
    toc = "".join(f'<li><a href="#{e(s.id)}">{e(s.title)}</a></li>' for s in sections)
    parts = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             # an empty data: icon stops the browser from asking for /favicon.ico
             f'<link rel="icon" href="data:,"><title>{e(title)}</title><style>{_CSS}</style></head><body>',
             f"<h1>{e(title)}</h1>"]
    parts += [f'<p class="intro">{e(p)}</p>' for p in intro]
    parts.append(f"<nav><ul>{toc}</ul></nav>")
    for section in sections:
        parts.append(f'<section id="{e(section.id)}"><h2>{e(section.title)}</h2>')
        parts += [f'<p class="intro">{e(p)}</p>' for p in section.intro]
        shared = section.shared_notes()
        if shared:
            items = "".join(f"<li>{e(note)}</li>" for note in shared)
            parts.append(f'<div class="note-block"><p>For every table of this section:</p>'
                         f'<ul class="notes">{items}</ul></div>')
        split = len(section.tables) if section.figures_after is None else section.figures_after
        parts += [_table_html(t, shared) for t in section.tables[:split]]
        if section.figures:
            parts.append('<div class="figures">' + "".join(_figure_html(f) for f in section.figures) + "</div>")
        parts += [_table_html(t, shared) for t in section.tables[split:]]
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
