"""Run the collector's command line in this process."""

from __future__ import annotations

import io

from collector.cli import main


def run(*argv: str) -> tuple[int, str]:
    """`exfilwatch-collector ARGV...`: (exit code, what it wrote to stdout)."""
    out = io.StringIO()
    rc = main(list(argv), out=out)
    return rc, out.getvalue()
