"""Fixtures shared by the collector tests: a store on disk, and an initialised data folder.
A module that needs another kind defines its own fixture of the same name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.store import SqliteStore
from tests.collector.clirun import run


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "collector.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore.open(db_path) as s:
        yield s


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data folder after `exfilwatch-collector init`."""
    d = tmp_path / "d"
    assert run("init", "--data", str(d))[0] == 0
    return d
