"""agent.labels: extended attribute first, then path rules."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agent.config import AgentConfig, LabelsConfig, PathRule
from agent.errors import LabelError
from agent.labels import Labelled, Labeller, LabelSource

XATTR = "user.exfilwatch.label"


def make_config(
    rules: tuple[PathRule, ...] = (), labels: LabelsConfig | None = None
) -> AgentConfig:
    return AgentConfig(
        state_dir=Path("/nonexistent/state"),
        sensitive_roots=(Path("/nonexistent/sensitive"),),
        destinations=(),
        host="test-host",
        labels=labels or LabelsConfig(),
        path_rules=rules,
    )


@pytest.fixture
def labelled_file(tmp_path: Path):
    """Factory: a file with the label attribute set (skips if the fs rejects user xattrs)."""

    def make(name: str, value: bytes | None, *, attr: str = XATTR) -> bytes:
        path = os.fsencode(tmp_path) + b"/" + os.fsencode(name)
        with open(path, "wb") as f:
            f.write(b"payload")
        if value is not None:
            try:
                os.setxattr(path, attr, value)
            except OSError as e:
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                    pytest.skip(f"filesystem of {tmp_path} rejects user xattrs: {e}")
                raise
        return path

    return make


def test_label_from_xattr(labelled_file) -> None:
    path = labelled_file("plan.pdf", b"secret")
    assert Labeller(make_config()).label_of(path) == Labelled("secret", LabelSource.XATTR)


def test_xattr_value_is_normalised(labelled_file) -> None:
    path = labelled_file("plan.pdf", b" Confidential\n\x00")
    assert Labeller(make_config()).label_of(path) == Labelled("confidential", LabelSource.XATTR)


def test_xattr_beats_path_rules_of_equal_rank(labelled_file) -> None:
    path = labelled_file("plan.pdf", b"secret")
    labeller = Labeller(make_config((PathRule("*", "secret"),)))
    assert labeller.label_of(path) == Labelled("secret", LabelSource.XATTR)


def test_higher_path_rule_beats_lower_xattr(labelled_file) -> None:
    # Issue 3: the highest-ranked source wins (it used to be the attribute, always).
    path = labelled_file("plan.pdf", b"internal")
    labeller = Labeller(make_config((PathRule("*", "secret"),)))
    assert labeller.label_of(path) == Labelled("secret", LabelSource.PATH)


def test_unknown_xattr_value_is_ignored_and_counted(labelled_file, caplog) -> None:
    path = labelled_file("plan.pdf", b"ultra")
    labeller = Labeller(make_config((PathRule("*/plan.pdf", "secret"),)))
    assert labeller.label_of(path) == Labelled("secret", LabelSource.PATH)
    assert labeller.invalid_values == 1
    assert "not a configured label" in caplog.text


def test_configured_attribute_name(labelled_file) -> None:
    path = labelled_file("a.txt", b"high", attr="user.acme.class")
    config = make_config(labels=LabelsConfig(levels=("low", "high"), xattr="user.acme.class"))
    assert Labeller(config).label_of(path) == Labelled("high", LabelSource.XATTR)
    assert Labeller(make_config()).label_of(path) is None


def test_no_label(labelled_file) -> None:
    assert Labeller(make_config()).label_of(labelled_file("a.txt", None)) is None


def test_path_rules_first_match_wins_and_star_crosses_slashes() -> None:
    labeller = Labeller(
        make_config(
            (
                PathRule("**/board/**", "secret"),
                PathRule("*/hr/*.xlsx", "confidential"),
                PathRule("*.xlsx", "internal"),
            )
        ),
        read_xattr=_no_xattr,
    )
    assert labeller.label_of(b"/srv/board/2024/minutes.docx") == Labelled(
        "secret", LabelSource.PATH
    )
    assert labeller.label_of(b"/srv/hr/deep/pay.xlsx") == Labelled("confidential", LabelSource.PATH)
    assert labeller.label_of(b"/srv/other/pay.xlsx") == Labelled("internal", LabelSource.PATH)
    assert labeller.label_of(b"/srv/other/notes.txt") is None


def test_path_rules_match_non_utf8_names() -> None:
    labeller = Labeller(make_config((PathRule("*/board/*", "secret"),)), read_xattr=_no_xattr)
    assert labeller.label_of(b"/srv/board/caf\xe9.txt") == Labelled("secret", LabelSource.PATH)


def test_only_regular_files_are_labelled(tmp_path) -> None:
    labeller = Labeller(make_config((PathRule("*", "secret"),)), read_xattr=_no_xattr)
    assert labeller.label_of(os.fsencode(tmp_path), os.stat(tmp_path)) is None


@pytest.mark.parametrize("code", [errno.ENOTSUP, errno.ENODATA])
def test_unsupported_or_unset_attribute_falls_back_to_path_rules(code) -> None:
    def read(path: bytes, name: str) -> bytes:
        raise OSError(code, os.strerror(code))

    labeller = Labeller(make_config((PathRule("*", "internal"),)), read_xattr=read)
    assert labeller.label_of(b"/x/y") == Labelled("internal", LabelSource.PATH)


def test_unreadable_attribute_is_a_label_error_with_cause() -> None:
    def read(path: bytes, name: str) -> bytes:
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(
        LabelError, match=r"cannot read user.exfilwatch.label of /x/caf\\xe9"
    ) as info:
        Labeller(make_config(), read_xattr=read).label_of(b"/x/caf\xe9")
    assert isinstance(info.value.__cause__, PermissionError)


def test_vanished_file_is_a_label_error_caused_by_file_not_found(tmp_path) -> None:
    with pytest.raises(LabelError) as info:
        Labeller(make_config()).label_of(os.fsencode(tmp_path / "gone"))
    assert isinstance(info.value.__cause__, FileNotFoundError)


def _no_xattr(path: bytes, name: str) -> bytes:
    raise OSError(errno.ENODATA, "No data available")
