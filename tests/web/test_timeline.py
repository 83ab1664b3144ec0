"""The alert timeline's numbers: cumulative line, threshold line, the dimension drawn."""

from __future__ import annotations

from collector.web.timeline import HEIGHT, build

S = 10**9
T0 = 1_700_000_000 * S


def test_no_points_no_timeline() -> None:
    assert build([], threshold_bytes=100, threshold_files=None) is None


def test_cumulative_bytes_cross_the_threshold_line() -> None:
    points = [(T0 + i * 60 * S, 30) for i in range(5)]  # 150 bytes over 4 minutes
    line = build(points, threshold_bytes=100, threshold_files=None)
    assert line is not None and line.unit == "bytes"
    assert line.total_label == "150 B" and line.threshold_label == "threshold 100 B"
    assert line.crossed_at is not None and line.crossed_at.endswith("22:16:20")  # 4th point: 120 B
    ys = [y for _, y in line.dots]
    assert ys == sorted(ys, reverse=True)  # rising line: SVG y grows downwards
    assert line.threshold_y is not None and ys[-1] < line.threshold_y < ys[0]
    assert line.plot_top <= line.threshold_y <= HEIGHT
    assert len(line.dots) == 5 and line.path.startswith("M ")
    assert line.x_ticks[0][1] == "22:13"


def test_the_dimension_that_raised_the_alert_is_drawn() -> None:
    points = [(T0 + i * S, 1000) for i in range(25)]  # 25 small files: files crossed
    line = build(points, threshold_bytes=100 * 2**20, threshold_files=20)
    assert line is not None and line.unit == "files"
    assert line.threshold_label == "threshold 20" and line.other == "bytes 24.4 KiB of 100.0 MiB"
    big = [(T0 + i * S, 30 * 2**20) for i in range(5)]  # 150 MiB in 5 files: bytes crossed
    line = build(big, threshold_bytes=100 * 2**20, threshold_files=20)
    assert line is not None and line.unit == "bytes" and line.other == "files 5 of 20"


def test_one_instant_and_no_rule() -> None:
    line = build([(T0, 10), (T0, 20)], threshold_bytes=None, threshold_files=None)
    assert line is not None and line.threshold_y is None and line.crossed_at is None
    assert len(line.x_ticks) == 1 and line.total_label == "30 B"
