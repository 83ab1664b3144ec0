"""A measure over time against horizontal threshold lines, as SVG coordinates.

    long-rule series (time, value) + tiers -> **chart** (coordinates, ticks) -> SVG in
    the template (`_long.html`)

The long-rule pages' counterpart of `collector.web.timeline`: there the line only
grows (cumulative bytes of a burst); here it rises and falls (a sliding window, a
decaying score), and a rule has several lines (its tiers). Pure: numbers only; the
template draws them with presentation attributes (the CSP forbids inline style).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from collector.web.timeline import (
    BOTTOM,
    HEIGHT,
    LEFT,
    MAX_DOTS,
    MAX_STEPS,
    RIGHT,
    TOP,
    WIDTH,
    Axes,
)

SEVERITY_COLOURS = {
    "low": "#1f5fbf",
    "medium": "#a15c00",
    "high": "#c62828",
    "critical": "#5b0f0a",
}
"""Tier lines by severity; any other name (a baseline's threshold) is drawn in red."""


@dataclass(frozen=True)
class Level:
    """One horizontal line: a tier or threshold."""

    y: float
    label: str
    """E.g. "high 30" or "threshold 5"."""
    colour: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    path: str
    """SVG path data of the measure."""
    dots: tuple[tuple[float, float], ...]
    levels: tuple[Level, ...]
    x_ticks: tuple[tuple[float, str], ...]
    y_ticks: tuple[tuple[float, str], ...]
    above: tuple[str, ...]
    """Levels left out because they lie far above the line (named in the caption)."""
    plot_left: int = LEFT
    plot_right: int = WIDTH - RIGHT
    plot_top: int = TOP
    plot_bottom: int = HEIGHT - BOTTOM


def build(
    points: Sequence[tuple[int, float]],
    levels: Sequence[tuple[str, float]],
    *,
    label: Callable[[float], str],
    steps: bool = True,
) -> Chart | None:
    """Chart of (time ns, value) points, oldest first; None with no points.

    `levels` are (name, value) ascending, e.g. a rule's tiers. Each level up to the
    first one the line has not reached is drawn; higher ones would squash the line
    into the bottom of the plot and are only named (`above`). `steps`: hold each
    value until the next point (a count), else join the points (a decaying score).
    """
    if not points:
        return None
    times = [t for t, _ in points]
    values = [float(v) for _, v in points]
    peak = max(values)
    drawn: list[tuple[str, float]] = []
    above: list[str] = []
    for name, value in levels:
        if not drawn or drawn[-1][1] <= peak:
            drawn.append((name, value))
        else:
            above.append(f"{name} {label(value)}")
    axes = Axes.fit(times, max([peak, *(v for _, v in drawn)]))
    x, y = axes.x, axes.y
    kept: Sequence[int] = range(len(times))
    if len(times) > MAX_STEPS:
        every = -(-len(times) // (MAX_STEPS - 2))
        peak_at = values.index(peak)
        kept = sorted({*range(0, len(times), every), len(times) - 1, peak_at})
    first = kept[0]
    parts = [f"M {x(times[first])} {y(values[first])}"]
    prev = values[first]
    for i in kept[1:]:
        if steps:
            parts.append(f"L {x(times[i])} {y(prev)}")
        parts.append(f"L {x(times[i])} {y(values[i])}")
        prev = values[i]
    every_dot = max(1, len(times) // MAX_DOTS)
    dots = tuple((x(t), y(v)) for t, v in list(zip(times, values, strict=True))[::every_dot])
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        path=" ".join(parts),
        dots=dots,
        levels=tuple(
            Level(y(value), f"{name} {label(value)}", SEVERITY_COLOURS.get(name, "#c62828"))
            for name, value in drawn
        ),
        x_ticks=axes.x_ticks(),
        y_ticks=axes.y_ticks(label),
        above=tuple(above),
    )


def utc(ns: int) -> str:
    """A point in time as the console shows it (UTC, to the second)."""
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
