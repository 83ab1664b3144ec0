"""Labels at the source: which sensitivity label a file in a sensitive root carries.

Sits between the watcher/scanner and the sensitive index. Sources, first hit wins:
the extended attribute (default `user.exfilwatch.label`), then the path rules.
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
from agent.errors import LabelError

logger = logging.getLogger(__name__)

_NO_XATTR = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP})


class LabelSource(StrEnum):
    XATTR = "xattr"
    PATH = "path"


@dataclass(frozen=True)
class Labelled:
    label: str
    """One of the configured levels."""
    label_source: LabelSource


def _getxattr(path: bytes, name: str) -> bytes:
    return os.getxattr(path, name, follow_symlinks=False)


class Labeller:
    """Reads a file's label: extended attribute first, then path rules.

    `read_xattr` is `os.getxattr` without following symlinks; tests may pass a
    fake. An attribute whose value is not a configured level is ignored (and
    counted in `invalid_values`), so the path rules still apply.
    """

    def __init__(
        self, config: AgentConfig, *, read_xattr: Callable[[bytes, str], bytes] = _getxattr
    ) -> None:
        self._xattr = config.labels.xattr
        self._levels = {level.lower(): level for level in config.labels.levels}
        self._rules = tuple((os.fsencode(rule.glob), rule.label) for rule in config.path_rules)
        self._read_xattr = read_xattr
        self.invalid_values = 0

    def label_of(self, path: bytes, st: os.stat_result | None = None) -> Labelled | None:
        """The label of the file at `path`, or None when it carries none.

        Only regular files are labelled (`st`, when given, is checked). Raises
        `LabelError` when the attribute cannot be read for another reason than
        "not supported" or "not set" (the cause is chained: `FileNotFoundError`
        means the file vanished).
        """
        if st is not None and not stat.S_ISREG(st.st_mode):
            return None
        label = self._from_xattr(path)
        if label is not None:
            return Labelled(label, LabelSource.XATTR)
        for pattern, rule_label in self._rules:
            if fnmatch.fnmatchcase(path, pattern):
                return Labelled(rule_label, LabelSource.PATH)
        return None

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
