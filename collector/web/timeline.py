"""The alert page's timeline: cumulative bytes (or files) over time against the rule's line.

    alert events (time, size) -> **timeline** (coordinates, ticks) -> SVG in the template

Pure: it computes numbers; the template draws them with presentation attributes only
(the console's Content-Security-Policy forbids inline style).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from collector.render import human_bytes

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 76, 16, 14, 34
MAX_DOTS = 2000
"""Markers drawn at most."""
MAX_STEPS = 4000
"""Steps of the line drawn at most. Beyond, every k-th is kept (and the last, and the one
that crossed the threshold): at 720 pixels the line looks the same, and an insider who
copies a million small files does not make their own alert's page too big to open."""


@dataclass(frozen=True)
class Timeline:
    width: int
    height: int
    path: str
    """SVG path data of the cumulative step line."""
    dots: tuple[tuple[float, float], ...]
    threshold_y: float | None
    """Where the rule's threshold line sits; None when the rule sets none in this unit."""
    threshold_label: str
    x_ticks: tuple[tuple[float, str], ...]
    y_ticks: tuple[tuple[float, str], ...]
    unit: str
    """"bytes" or "files"."""
    total_label: str
    crossed_at: str | None
    """When the cumulative line first reached the threshold (UTC), if it did."""
    other: str
    """The dimension not drawn, in words ("170.5 KiB of 100.0 MiB"), or ""."""
    plot_left: int = LEFT
    plot_right: int = WIDTH - RIGHT
    plot_top: int = TOP
    plot_bottom: int = HEIGHT - BOTTOM


def _label(value: float, unit: str) -> str:
    return human_bytes(int(value)) if unit == "bytes" else f"{int(value)}"


def time_label(ns: int, span_ns: int) -> str:
    when = dt.datetime.fromtimestamp(ns / 1e9, dt.UTC)
    if span_ns < 10 * 10**9:
        return when.strftime("%H:%M:%S.%f")[:-3]
    if span_ns < 120 * 10**9:
        return when.strftime("%H:%M:%S")
    if span_ns < 2 * 86400 * 10**9:
        return when.strftime("%H:%M")
    return when.strftime("%m-%d %H:%M")


def nice_step(top: float, ticks: int = 4) -> float:
    raw = top / ticks
    if raw <= 0:
        return 1.0
    magnitude = float(10 ** (len(str(int(raw))) - 1))
    for step in (1, 2, 2.5, 5, 10):
        if step * magnitude >= raw:
            return step * magnitude
    return 10.0 * magnitude


@dataclass(frozen=True)
class Axes:
    """The scales of a plot: times from `t0` to `t1` across, values from 0 to `top` (a round
    number above the highest value, ticks every `step`) up. Shared with collector.web.chart."""

    t0: int
    t1: int
    top: float
    step: float

    @classmethod
    def fit(cls, times: Sequence[int], highest: float) -> Axes:
        """Axes for ascending `times` and values up to `highest`."""
        top = highest * 1.1 or 1.0
        step = nice_step(top)
        return cls(times[0], times[-1], step * (int(top // step) + 1), step)

    def x(self, t: int) -> float:
        x0, x1 = LEFT, WIDTH - RIGHT
        if self.t1 == self.t0:
            return (x0 + x1) / 2
        return round(x0 + (t - self.t0) / max(self.t1 - self.t0, 1) * (x1 - x0), 1)

    def y(self, v: float) -> float:
        y0, y1 = HEIGHT - BOTTOM, TOP
        return round(y0 - v / self.top * (y0 - y1), 1)

    def y_ticks(self, label: Callable[[float], str]) -> tuple[tuple[float, str], ...]:
        values = [i * self.step for i in range(int(self.top // self.step) + 1)]
        return tuple((self.y(v), label(v)) for v in values)

    def x_ticks(self) -> tuple[tuple[float, str], ...]:
        """Five times across (one when all points share a time), without repeated labels."""
        t0, span = self.t0, max(self.t1 - self.t0, 1)
        ticks = tuple(
            (self.x(t0 + span * i // 4), time_label(t0 + span * i // 4, span)) for i in range(5)
        )
        if self.t1 == t0:
            ticks = ((self.x(t0), time_label(t0, 0)),)
        labels = [label for _, label in ticks]
        return tuple(tick for i, tick in enumerate(ticks) if tick[1] not in labels[:i])


def build(
    points: Sequence[tuple[int, int]],
    *,
    threshold_bytes: int | None,
    threshold_files: int | None,
) -> Timeline | None:
    """Timeline of (observed_at_ns, size) points, oldest first; None with no points.

    A rule may count bytes, files or both (whichever is crossed first raises the alert).
    The line drawn is the one that got nearest its threshold, i.e. the one that raised
    the alert: cumulative bytes, unless the file count went further past its line.
    """
    if not points:
        return None
    total_bytes = sum(size for _, size in points)
    byte_ratio = total_bytes / threshold_bytes if threshold_bytes else 0.0
    file_ratio = len(points) / threshold_files if threshold_files else 0.0
    unit = "files" if file_ratio > byte_ratio else "bytes"
    threshold = threshold_files if unit == "files" else threshold_bytes
    times, values, total = [], [], 0
    for t, size in points:
        total += 1 if unit == "files" else size
        times.append(t)
        values.append(total)
    axes = Axes.fit(times, max(total, threshold or 0))
    x, y = axes.x, axes.y
    crossing = None
    if threshold is not None:
        crossing = next((i for i, v in enumerate(values) if v >= threshold), None)
    steps: Sequence[int] = range(len(times))
    if len(times) > MAX_STEPS:
        kept = set(range(0, len(times), -(-len(times) // (MAX_STEPS - 2))))
        kept |= {len(times) - 1} | ({crossing} if crossing is not None else set())
        steps = sorted(kept)
    parts = [f"M {x(times[0])} {y(0)}"]
    prev = 0
    for i in steps:
        parts.append(f"L {x(times[i])} {y(prev)} L {x(times[i])} {y(values[i])}")
        prev = values[i]
    every = max(1, len(times) // MAX_DOTS)
    dots = tuple((x(t), y(v)) for t, v in list(zip(times, values, strict=True))[::every])
    crossed = None
    if crossing is not None:
        hit = times[crossing]
        crossed = dt.datetime.fromtimestamp(hit / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return Timeline(
        width=WIDTH,
        height=HEIGHT,
        path=" ".join(parts),
        dots=dots,
        threshold_y=None if threshold is None else y(threshold),
        threshold_label="" if threshold is None else f"threshold {_label(threshold, unit)}",
        x_ticks=axes.x_ticks(),
        y_ticks=axes.y_ticks(lambda v: _label(v, unit)),
        unit=unit,
        total_label=_label(total, unit),
        crossed_at=crossed,
        other=_other(unit, total_bytes, len(points), threshold_bytes, threshold_files),
    )


def _other(
    unit: str, n_bytes: int, n_files: int, max_bytes: int | None, max_files: int | None
) -> str:
    if unit == "files":
        limit = f" of {human_bytes(max_bytes)}" if max_bytes else ""
        return f"bytes {human_bytes(n_bytes)}{limit}"
    limit = f" of {max_files}" if max_files else ""
    return f"files {n_files}{limit}"
