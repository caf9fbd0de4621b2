"""Figures of the report as inline PNGs (the HTML has no external assets)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any


def new_figure(width: float = 6.0, height: float = 3.5) -> tuple[Any, Any]:
    """A matplotlib (figure, axes) drawn off screen (the Agg backend: no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def figure_img(fig: Any, alt: str) -> str:
    """An <img> tag holding `fig` as a base64 PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain HTML table; floats with 4 significant digits."""
    def cell(v: Any) -> str:
        return html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
