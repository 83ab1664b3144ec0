"""File names are attacker-chosen: printing one must never do anything but print it."""

from __future__ import annotations

from collector.render import display_path, display_text, human_bytes, human_duration


def test_invalid_utf8_is_shown_as_escapes() -> None:
    assert display_path(b"bad_\xff\xfe.txt") == "bad_\\xff\\xfe.txt"


def test_control_characters_cannot_move_the_cursor_or_add_lines() -> None:
    shown = display_path(b"a\x1b[2Jb\nc\rd\te\x7f")
    assert "\x1b" not in shown and "\n" not in shown and "\r" not in shown
    assert shown == "a\\x1b[2Jb\\x0ac\\x0dd\\x09e\\x7f"


def test_invisible_and_bidi_characters_are_escaped() -> None:
    shown = display_path("invoice\u202etxt.exe".encode())
    assert "\u202e" not in shown and "\\u202e" in shown


def test_ordinary_names_are_unchanged() -> None:
    assert display_path("Vorstand/Protokoll März.docx".encode()) == "Vorstand/Protokoll März.docx"


def test_sizes_and_durations() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(412 * 1024 * 1024) == "412.0 MiB"
    assert human_duration(5) == "5 s"
    assert human_duration(8 * 60) == "8 min"


def test_display_text_escapes_free_text_and_leaves_escaped_text_alone() -> None:
    hostile = "King\x1b[2Jston \u202eDT50\x07 \udcff"
    shown = display_text(hostile)
    assert shown == "King\\x1b[2Jston \\u202eDT50\\x07 \\xed\\xb3\\xbf"  # a lone surrogate
    assert display_text(shown) == shown
    assert display_text("Kingston DataTraveler 50") == "Kingston DataTraveler 50"
