"""collector.metrics: counters and gauges in Prometheus' text format, the store's counts, and
what ingest counts (in process; tests/e2e/test_metrics.py serves them from a real collector)."""

from __future__ import annotations

import math

import pytest

from collector.errors import SignatureError
from collector.ingest import Ingestor
from collector.metrics import Gauge, Metrics, store_gauges
from collector.policy import load_policy
from collector.records import StoreCounts
from collector.store import SqliteStore
from tests.collector.batches import T0, BatchChain, enroll, new_agent
from tests.conftest import POLICY

MINUTE = 60 * 10**9


def test_counters_render_at_zero_then_by_label() -> None:
    m = Metrics()
    text = m.render()
    assert "# TYPE exfilwatch_batches_total counter\nexfilwatch_batches_total 0\n" in text
    m.add("exfilwatch_batches_refused_total", reason="SignatureError")
    m.add("exfilwatch_batches_refused_total", reason="SignatureError")
    m.add("exfilwatch_batches_refused_total", reason='odd"\\\nreason')
    m.add("exfilwatch_events_stored_total", 500)
    text = m.render()
    assert 'exfilwatch_batches_refused_total{reason="SignatureError"} 2\n' in text
    assert 'exfilwatch_batches_refused_total{reason="odd\\"\\\\\\nreason"} 1\n' in text
    assert "exfilwatch_events_stored_total 500\n" in text
    assert "exfilwatch_batches_refused_total 0" not in text  # labelled samples replace the 0
    with pytest.raises(ValueError, match="unknown counter"):
        m.add("exfilwatch_typo_total")


def test_values_that_are_not_finite_use_the_formats_spellings() -> None:
    gauges = [Gauge("g", "help", [({"k": "nan"}, math.nan), ({"k": "inf"}, math.inf)])]
    text = Metrics().render(gauges)
    assert 'g{k="nan"} NaN\n' in text and 'g{k="inf"} +Inf\n' in text


def test_store_counts_become_gauges() -> None:
    counts = StoreCounts(
        agents=10, revoked=1, silent=2, spool_depth=345, agents_with_gaps=3,
        max_cpu_percent=12.5, max_rss_bytes=75_000_000, events=9_000,
        open_alerts={("threshold", "new"): 4, ("security", "in_progress"): 1},
    )  # fmt: skip
    text = Metrics().render(store_gauges(counts, restoring=True))
    for line in (
        'exfilwatch_agents{state="active"} 7',
        'exfilwatch_agents{state="silent"} 2',
        'exfilwatch_agents{state="revoked"} 1',
        "exfilwatch_agents_spool_events 345",
        "exfilwatch_agents_with_coverage_gaps 3",
        "exfilwatch_agent_cpu_percent_max 12.5",
        "exfilwatch_agent_rss_bytes_max 75000000",
        "exfilwatch_events_in_store 9000",
        'exfilwatch_alerts_open{kind="security",status="in_progress"} 1',
        'exfilwatch_alerts_open{kind="threshold",status="new"} 4',
        "exfilwatch_rules_restoring 1",
    ):
        assert line + "\n" in text
    assert "# TYPE exfilwatch_agents gauge\n" in text


def test_the_store_counts_agents_events_and_open_alerts(store: SqliteStore) -> None:
    quiet, busy, gone = new_agent(), new_agent(), new_agent()
    for agent in (quiet, busy, gone):
        enroll(store, agent)
    store.touch_agent(
        busy.agent_id, T0 + 30 * MINUTE, spool_depth=120, coverage_gaps=2, cpu_percent=1.5,
        rss_bytes=70 * 2**20,
    )  # fmt: skip
    store.touch_agent(gone.agent_id, T0, cpu_percent=99.0, rss_bytes=900 * 2**20)
    store.revoke_agent(gone.agent_id)
    ingest = Ingestor(store, load_policy(POLICY))
    chain = BatchChain(busy)
    for _ in range(5):  # 25 copies to USB: one alert
        ingest.upload(chain.next(n=5).raw, busy.agent_id, T0 + 30 * MINUTE)
    store.record_security_alert(quiet.agent_id, "SignatureError", "bad", T0)
    counts = store.counts(silent_before_ns=T0 + 25 * MINUTE)
    assert (counts.agents, counts.revoked, counts.silent) == (3, 1, 1)
    assert (counts.spool_depth, counts.agents_with_gaps, counts.events) == (120, 1, 25)
    assert counts.open_alerts == {("threshold", "new"): 1, ("security", "new"): 1}
    assert (counts.max_cpu_percent, counts.max_rss_bytes) == (1.5, 70 * 2**20)  # not revoked


def test_ingest_counts_what_it_stores_and_refuses(store: SqliteStore) -> None:
    agent, forger = new_agent(), new_agent()
    enroll(store, agent)
    metrics = Metrics()
    ingest = Ingestor(store, load_policy(POLICY), metrics=metrics)
    chain = BatchChain(agent)
    batches = [chain.next(n=10) for _ in range(3)]
    for signed in batches:
        ingest.upload(signed.raw, agent.agent_id, T0 + MINUTE)
    ingest.upload(batches[0].raw, agent.agent_id, T0 + MINUTE)  # a byte-identical replay
    with pytest.raises(SignatureError):
        ingest.upload(BatchChain(forger).next().raw, agent.agent_id, T0 + MINUTE)
    assert metrics.value("exfilwatch_batches_total", outcome="stored") == 3
    assert metrics.value("exfilwatch_batches_total", outcome="duplicate") == 1
    assert metrics.value("exfilwatch_events_stored_total") == 30
    # 30 copies: bulk-copy-to-usb (20 files in 10 min) and the 30-day rule (30 files)
    assert metrics.value("exfilwatch_alerts_opened_total") == 2
    assert metrics.value("exfilwatch_batches_refused_total", reason="SignatureError") == 1
