"""agent.spool.Spool.sync: pending events made durable without sealing them (issue 4).

While a batch waits for the collector the shipper seals nothing more (so the byte cap can
still rank pending events) and calls `sync` instead. Power loss is simulated with the
LD_PRELOAD shim of tests/agent/test_spool.py: writes made after a file's last fsync are undone.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from agent.signer import Signer
from agent.spool import SPOOL_FILE, Spool
from tests.agent.test_spool import power_cut, powercut_so
from tests.procs import Proc

__all__ = ["powercut_so"]  # the fixture, used by name

_SCRIPT = """
import os, signal, sys
from pathlib import Path
from agent.events import Action, Event, EventId
from agent.signer import Signer
from agent.spool import Spool

spool = Spool.open(Path(sys.argv[1]), agent_id="agent-1", signer=Signer.load(Path(sys.argv[2])))
sync = sys.argv[3] == "sync"
for i in range(1, 14):
    spool.append([Event(EventId(f"ev-{i}"), i, Action.COPY, "h", "v")])
    if i == 10 and sync:
        spool.sync()
print("appended", i, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("mode", ["sync", "no-sync"])
def test_sync_makes_earlier_appends_survive_power_loss(
    tmp_path: Path, powercut_so: Path, mode: str
) -> None:
    signer = Signer.generate()
    key = tmp_path / "agent.key"
    signer.save(key)
    spool_path = tmp_path / SPOOL_FILE
    journal = tmp_path / "writes.journal"
    proc = Proc(
        [sys.executable, "-c", _SCRIPT, str(spool_path), str(key), mode],
        tmp_path / "run.log",
        {
            "LD_PRELOAD": str(powercut_so),
            "POWERCUT_DIR": str(tmp_path),
            "POWERCUT_LOG": str(journal),
        },
    )
    proc.wait_line("appended 13", timeout=60)
    assert proc.stop(signal.SIGKILL) == -signal.SIGKILL, proc.stderr_tail()
    power_cut(journal)

    with Spool.open(spool_path, agent_id="agent-1", signer=signer) as spool:
        pending, sealed = spool.depth()
    # With sync: seqs 1..10 were fsynced, 11..13 were not. Without: none was.
    assert (pending, sealed) == ((10, 0) if mode == "sync" else (0, 0))
