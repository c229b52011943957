"""One report, two renderings: Markdown beside its files (for a repository or a paper draft) and
one self-contained HTML page (figures inlined as data URIs) that a person opens with a double
click or receives as a single MLflow artifact.

The report is built once as a list of blocks, so the two can never disagree.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.tables import markdown

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.2em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f3f3f3}
blockquote{border-left:4px solid #d9822b;background:#fff7ee;margin:.6em 0;padding:.4em .8em}
img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555;margin-bottom:1.5em}
li.claim{margin:.2em 0}li.supported{font-weight:600}
"""


@dataclass
class Document:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def note(self, text: str) -> None:
        """A warning a reader must not miss (mixed clocks, mixed hardware, a refused grouping)."""
        self.blocks.append(("note", text))

    def items(self, lines: list[str], strong: list[bool] | None = None) -> None:
        self.blocks.append(("items", (lines, strong or [False] * len(lines))))

    def table(self, display: pd.DataFrame) -> None:
        self.blocks.append(("table", display))

    def figure(self, png: Path, caption: str) -> None:
        self.blocks.append(("figure", (Path(png), caption)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, body in self.blocks:
            if kind == "heading":
                out += ["#" * body[0] + " " + body[1], ""]
            elif kind == "text":
                out += [body, ""]
            elif kind == "note":
                out += [f"> {body}", ""]
            elif kind == "items":
                out += [f"- {'**' + line + '**' if bold else line}" for line, bold in zip(*body)] + [""]
            elif kind == "table":
                out += [markdown(body), ""]
            elif kind == "figure":
                out += [f"![{body[1]}]({body[0].name})", "", f"*{body[1]}*", ""]
        return "\n".join(out) + "\n"

    def html(self) -> str:
        out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{html.escape(self.title)}</title>",
               f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(self.title)}</h1>"]
        for kind, body in self.blocks:
            if kind == "heading":
                out.append(f"<h{body[0]}>{html.escape(body[1])}</h{body[0]}>")
            elif kind == "text":
                out.append(f"<p>{html.escape(body)}</p>")
            elif kind == "note":
                out.append(f"<blockquote>{html.escape(body.replace('**', ''))}</blockquote>")
            elif kind == "items":
                lis = [f"<li class='claim{' supported' if bold else ''}'>{html.escape(line)}</li>" for line, bold in zip(*body)]
                out.append("<ul>" + "".join(lis) + "</ul>")
            elif kind == "table":
                out.append(body.reset_index().to_html(index=False, border=0, na_rep="-"))
            elif kind == "figure":
                data = base64.b64encode(body[0].read_bytes()).decode()
                out.append(f"<figure><img alt='{html.escape(body[1], quote=True)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{html.escape(body[1])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)
