"""The one way cda2_ext makes and writes figures.

Figures are built on ``matplotlib.figure.Figure`` directly rather than through pyplot, so writing
a PNG neither needs a display nor switches the backend of a user's session (a notebook keeps its
inline backend).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Tuple, Union

__all__ = ["new_figure", "save_figure"]


def new_figure(nrows: int = 1, ncols: int = 1, figsize: Tuple[float, float] = (8, 5.5)) -> Tuple[Any, Any]:
    """``(figure, axes)`` like ``plt.subplots``, without touching pyplot's global state."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols)


def save_figure(fig: Any, path: Union[str, Path], dpi: int = 120) -> Path:
    """Lay out and write ``fig`` at ``path`` (parent folders created); returns the path.

    Written atomically (rendered in memory, then a temporary file renamed over ``path``), so an
    interrupted run never leaves half a figure where an earlier one was."""
    import io

    from .checkpoint import atomic_write
    fig.tight_layout()
    path = Path(path)
    buf = io.BytesIO()  # the format the name asks for (fig.pdf, fig.svg), PNG without a suffix
    fig.savefig(buf, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
    atomic_write(path, buf.getvalue())
    return path
