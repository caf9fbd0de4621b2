"""The report's HTML pieces: escaped text, tables, figures as inline PNGs (no external assets)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Sequence


def esc(x: Any) -> str:
    """HTML-escaped text of a value."""
    return html.escape(str(x))


def new_figure(width: float = 6.0, height: float = 3.5) -> tuple[Any, Any]:
    """A matplotlib (figure, axes) drawn off screen (the Agg backend: no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def figure_img(fig: Any, alt: str) -> str:
    """`fig` as an inline <img> (base64 PNG); a pyplot figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return (f'<div class="fig"><img alt="{esc(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode("ascii")}"></div>')


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """An HTML table of escaped cells; floats with 4 significant digits."""
    def cell(v: Any) -> str:
        return esc(f"{v:.4g}" if isinstance(v, float) else v)

    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"
