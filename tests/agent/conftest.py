"""Fixtures of the pipeline tests (tests.agent.pipeline_harness). A module that needs other
folders defines its own `dirs`, which takes precedence in that module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent.pipeline_harness import Dirs, Harness, harness_factory, make_dirs


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    return make_dirs(tmp_path)


@pytest.fixture
def harness(dirs: Dirs) -> Iterator[Callable[..., Harness]]:
    yield from harness_factory(dirs)
