"""Whether napari draws through software OpenGL (docs/speed.md, section 9).

A window holding an OpenGL canvas is composited through OpenGL on every repaint. Drawn in software
(Mesa's llvmpipe under Xvfb or a remote desktop, Windows' basic render driver), the animated
indicator that napari's activity dock shows while a progress bar is open takes most of a core, and
a model run in the widget took twice as long; the widget then shows its progress in the dock.
"""

from __future__ import annotations

__all__ = ["canvas_renderer", "is_software_renderer"]

#: Substrings of GL_RENDERER (lower case) that name a renderer drawing on the CPU.
SOFTWARE_RENDERERS = (
    "llvmpipe", "softpipe", "swrast", "software rasterizer", "swiftshader",
    "basic render driver", "gdi generic", "apple software renderer",
)


def is_software_renderer(renderer: str | None) -> bool:
    """True when ``renderer`` (an OpenGL GL_RENDERER string) draws on the CPU."""
    name = (renderer or "").lower()
    return any(software in name for software in SOFTWARE_RENDERERS)


def canvas_renderer() -> str | None:
    """GL_RENDERER of the current vispy canvas (napari's), None when there is no canvas to ask."""
    from vispy.gloo import get_current_canvas, gl

    canvas = get_current_canvas()
    if canvas is None:
        return None
    try:
        canvas.set_current()
        renderer = gl.glGetParameter(gl.GL_RENDERER)
    except Exception:  # noqa: BLE001  a context that cannot answer: napari's progress, as usual
        return None
    return renderer if isinstance(renderer, str) and renderer else None
