"""The one way cda2_ext makes and writes figures.

Figures are built on ``matplotlib.figure.Figure`` directly rather than through pyplot, so writing
a PNG neither needs a display nor switches the backend of a user's session (a notebook keeps its
inline backend).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Tuple, Union

__all__ = ["new_figure", "save_figure", "figure_format"]


def new_figure(nrows: int = 1, ncols: int = 1, figsize: Tuple[float, float] = (8, 5.5)) -> Tuple[Any, Any]:
    """``(figure, axes)`` like ``plt.subplots``, without touching pyplot's global state."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols)


def figure_format(path: Union[str, Path], option: str = "figure") -> str:
    """The image format a figure file's name asks for (``fig.pdf``: pdf; PNG without a suffix),
    or a :class:`~cda2_ext.errors.ConfigError` naming ``option`` when matplotlib cannot write it
    (checked before the work whose figure it is, not after)."""
    from matplotlib.backend_bases import FigureCanvasBase

    from .errors import ConfigError
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise ConfigError(f"{option}: cannot write a .{fmt} figure ({path}); use one of "
                          f"{', '.join(sorted(known))}")
    return fmt


def save_figure(fig: Any, path: Union[str, Path], dpi: int = 120) -> Path:
    """Lay out and write ``fig`` at ``path`` (parent folders created); returns the path.

    Written atomically (rendered in memory, then a temporary file renamed over ``path``), so an
    interrupted run never leaves half a figure where an earlier one was."""
    import io

    from .storage.checkpoint import atomic_write
    fig.tight_layout()
    path = Path(path)
    buf = io.BytesIO()  # the format the name asks for (fig.pdf, fig.svg), PNG without a suffix
    fig.savefig(buf, dpi=dpi, format=figure_format(path))
    atomic_write(path, buf.getvalue())
    return path
