"""Labels at the source: which sensitivity label a file in a sensitive root carries.

Sits between the watcher/scanner and the sensitive index. Sources: the extended
attribute (default `user.exfilwatch.label`), MIP label metadata, the path rules,
marker phrases and card numbers (`agent.content`). The highest-ranked label wins;
on ties, the source listed first.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from agent.config import AgentConfig
from agent.content import ContentLabel, ContentReader, ContentStats
from agent.errors import LabelError

logger = logging.getLogger(__name__)

_NO_XATTR = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP})


class LabelSource(StrEnum):
    """Where a label was read, in tie-break order (first wins on equal rank)."""

    XATTR = "xattr"
    MIP = "mip"
    PATH = "path"
    MARKER = "marker"
    CARD_NUMBER = "card_number"


_TIE_ORDER = {source: i for i, source in enumerate(LabelSource)}


@dataclass(frozen=True)
class Labelled:
    label: str
    """One of the configured levels."""
    label_source: LabelSource
    detail: str = ""
    """For content labels: the MIP label GUID, the marker phrase, or "n card numbers"."""


def _getxattr(path: bytes, name: str) -> bytes:
    return os.getxattr(path, name, follow_symlinks=False)


class Labeller:
    """Reads a file's label from its attribute, its content and its path.

    `read_xattr` is `os.getxattr` without following symlinks; tests may pass a
    fake. An attribute whose value is not a configured level is ignored (and
    counted in `invalid_values`), so the other sources still apply. Content is
    read only when `labels` configures content labels, and not at all once a
    cheaper source already gave the highest level.
    """

    def __init__(
        self, config: AgentConfig, *, read_xattr: Callable[[bytes, str], bytes] = _getxattr
    ) -> None:
        self._xattr = config.labels.xattr
        self._levels = {level.lower(): level for level in config.labels.levels}
        self._rules = tuple((os.fsencode(rule.glob), rule.label) for rule in config.path_rules)
        self._read_xattr = read_xattr
        self._rank = {level: i for i, level in enumerate(config.labels.levels)}
        self._top = len(config.labels.levels) - 1
        self._content = ContentReader(config.labels.content, config.labels.levels)
        self.invalid_values = 0

    @property
    def reads_content(self) -> bool:
        """False when `labels.content` configures nothing: `content_label` opens no file."""
        return self._content.enabled

    @property
    def content_stats(self) -> ContentStats:
        """Files (and parts of files) whose content could not be read, by reason."""
        return self._content.stats

    def label_of(self, path: bytes, st: os.stat_result | None = None) -> Labelled | None:
        """The label of the file at `path`, or None when it carries none.

        Only regular files are labelled (`st`, when given, is checked). Raises
        `LabelError` when the attribute cannot be read for another reason than
        "not supported" or "not set" (the cause is chained: `FileNotFoundError`
        means the file vanished).
        """
        if st is not None and not stat.S_ISREG(st.st_mode):
            return None
        found: list[Labelled] = []
        label = self._from_xattr(path)
        if label is not None:
            found.append(Labelled(label, LabelSource.XATTR))
        for pattern, rule_label in self._rules:
            if fnmatch.fnmatchcase(path, pattern):
                found.append(Labelled(rule_label, LabelSource.PATH))
                break
        if not any(self._rank.get(f.label) == self._top for f in found):
            content = self.content_label(path)
            if content is not None:
                found.append(content)
        return self._best(found)

    def content_label(self, path: bytes) -> Labelled | None:
        """The label the file's content carries (MIP metadata, markers, card numbers).

        No attribute, no path rule: for files arriving at a destination, whose
        attribute is usually gone and whose path says nothing. Never raises:
        unreadable content is counted in `content_stats`.
        """
        return _labelled(self._content.read(path))

    def _best(self, found: list[Labelled]) -> Labelled | None:
        """Highest rank first, then the tie-break order of `LabelSource`."""
        if not found:
            return None
        return max(found, key=lambda f: (self._rank.get(f.label, -1), -_TIE_ORDER[f.label_source]))

    def _from_xattr(self, path: bytes) -> str | None:
        try:
            raw = self._read_xattr(path, self._xattr)
        except OSError as e:
            if e.errno in _NO_XATTR:
                return None
            raise LabelError(
                f"cannot read {self._xattr} of {path.decode('utf-8', 'backslashreplace')}: "
                f"{e.strerror}"
            ) from e
        value = raw.strip(b"\x00 \t\r\n").decode("utf-8", "replace").lower()
        label = self._levels.get(value)
        if label is None:
            self.invalid_values += 1
            logger.warning(
                "ignoring %s on %s: not a configured label",
                self._xattr,
                path.decode("utf-8", "backslashreplace"),
            )
        return label


def _labelled(found: ContentLabel | None) -> Labelled | None:
    if found is None:
        return None
    return Labelled(found.label, LabelSource(found.source), found.detail)
