"""Content classifiers over a bounded piece of text: marker phrases and card numbers.

Pure functions used by `agent.content` on the first N KiB of a file (or of an
Office document's text). They return what matched, never the matched text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# FIELD-NOTES §5.4: the full candidate regex runs at 23-30 MB/s, this pre-filter at
# ~160 MB/s, so the full check only runs on the pre-filter's hits.
_CARD_PREFILTER = re.compile(r"[0-9][0-9 \-]{11,}[0-9]")
_CARD = re.compile(r"(?<![0-9])(?:[0-9][ \-]?){12,18}[0-9](?![0-9])")
_SEPARATORS = str.maketrans("", "", " -")


def compile_marker(phrase: str) -> re.Pattern[str]:
    """A case-insensitive pattern for `phrase` as whole words.

    Runs of whitespace in the phrase match any run of whitespace, so a marker
    wrapped over two lines still matches; `CONFIDENTIAL` does not match inside
    `NONCONFIDENTIALITY`.
    """
    words = phrase.split()
    body = r"\s+".join(re.escape(word) for word in words)
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def first_marker(
    text: str, markers: Sequence[tuple[re.Pattern[str], str, str]]
) -> tuple[str, str] | None:
    """(phrase, label) of the first of `markers` (pattern, phrase, label) found in `text`.

    The caller orders `markers` by preference (highest label first). A plain
    substring test on the lower-cased text rules most phrases out first: Python's
    case-insensitive regex search is about 30x slower than `in`.
    """
    lowered = text.lower()
    for pattern, phrase, label in markers:
        if phrase.split()[0].lower() in lowered and pattern.search(text):
            return phrase, label
    return None


def luhn_valid(digits: str) -> bool:
    """The Luhn mod-10 check over a string of ASCII digits."""
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if i % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def is_card_number(digits: str) -> bool:
    """13-19 digits, a card network's leading digit (2-6), and a valid Luhn check.

    The leading-digit test drops zero-filled and sequential identifiers that pass
    Luhn by chance (`0000 0000 0000 0000` does); every major network's numbers
    start with 2 (Mastercard), 3 (Amex, Diners, JCB), 4 (Visa), 5 or 6.
    """
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


def count_card_numbers(text: str, limit: int) -> int:
    """How many card numbers `text` holds, counting stops at `limit`."""
    found = 0
    for block in _CARD_PREFILTER.finditer(text):
        for candidate in _CARD.finditer(block.group()):
            if is_card_number(candidate.group().translate(_SEPARATORS)):
                found += 1
                if found >= limit:
                    return found
    return found


def decode_text(raw: bytes) -> str:
    """Bytes of unknown encoding as text for the classifiers.

    A UTF-16 byte-order mark selects UTF-16; anything else is read as UTF-8 with
    replacement characters, which keeps ASCII markers and digits intact in
    Latin-1 or binary data too.
    """
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16", "replace")
    return raw.decode("utf-8", "replace")


def join_limited(parts: Iterable[str], limit: int) -> str:
    """Concatenate `parts` up to `limit` characters."""
    out: list[str] = []
    size = 0
    for part in parts:
        if size >= limit:
            break
        out.append(part[: limit - size])
        size += len(out[-1])
    return "".join(out)
