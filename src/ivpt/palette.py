"""Class colours for masks and figures."""
from __future__ import annotations


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct, fixed colours per class (golden-angle hues)."""
    import colorsys

    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.75, 0.95)) for i in range(num_classes)]
