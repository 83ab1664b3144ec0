"""collector.reasons: the alert sentence, its words kept apart from its numbers."""

from __future__ import annotations

from dataclasses import replace

from collector.reasons import ReasonParts, human_size, human_span

S = 1_000_000_000
PARTS = ReasonParts(
    rule="bulk-copy-to-usb: 20 files / 100 MiB in 10m",
    user="alice",
    host="lt-0412",
    destination=None,
    label_rank=2,
    label="confidential",
    verbs=("copied",),
    destination_classes=("removable",),
)


def test_render_says_the_numbers_it_is_given_exactly() -> None:
    assert PARTS.render(25, 25_000, 0, 180 * S) == (
        "alice on lt-0412 copied 25 confidential files, 24.4 KiB (25000 bytes), to removable "
        "in 3 min; rule bulk-copy-to-usb: 20 files / 100 MiB in 10m"
    )
    assert PARTS.render(1, 900, 5, 5).startswith(
        "alice on lt-0412 copied 1 confidential file, 900 B,"
    )


def test_merge_keeps_the_most_sensitive_label_and_every_verb_and_class() -> None:
    other = ReasonParts(
        PARTS.rule, "alice", "lt-0412", None, 3, "secret", ("moved",), ("cloud_sync",)
    )
    merged = PARTS.merge(other)
    assert (merged.label, merged.verbs, merged.destination_classes) == (
        "secret",
        ("copied", "moved"),
        ("cloud_sync", "removable"),
    )
    assert merged.merge(PARTS) is merged  # nothing new: the same object
    assert PARTS.merge(replace(PARTS, label_rank=1, label="internal")) is PARTS


def test_json_round_trip_and_anything_else_is_none() -> None:
    assert ReasonParts.from_json(PARTS.to_json()) == PARTS
    for text in ("", "null", "[]", '{"format": 2}', "{not json", '{"format": 1}'):
        assert ReasonParts.from_json(text) is None


def test_group_values_cannot_break_the_line() -> None:
    hostile = ReasonParts(PARTS.rule, "eve\n#2 resolved", None, None, 2, "confidential",
                          ("copied",), ("removable",))  # fmt: skip
    line = hostile.render(2, 2048, 0, S)
    assert "\n" not in line and "eve\\n#2 resolved copied 2" in line


def test_sizes_and_spans() -> None:
    assert human_size(1023) == "1023 B"
    assert human_size(100 * 2**20) == "100.0 MiB (104857600 bytes)"
    assert [human_span(n * S) for n in (0, 59, 60, 7200, 3 * 86400)] == [
        "under 1 s",
        "59 s",
        "1 min",
        "2 h",
        "3 days",
    ]
