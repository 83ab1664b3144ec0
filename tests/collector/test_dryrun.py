"""`policy dry-run`: a candidate policy over a real store finds the insiders, changes nothing."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import time
from pathlib import Path

import pytest

from collector.cli import DB_FILE, main
from collector.detection.engine import DAY_NS, FindingKind
from collector.store import SqliteStore
from tests.collector.test_detection_simulation import (
    INSERT,
    START,
    TEST_WEEKS,
    build,
    copy_row,
    read_rows,
    run,
)

POLICY = """
labels: [public, internal, confidential, secret]
rules:
  - name: burst-10m
    match: {min_label: confidential, destinations: [removable, cloud_sync]}
    group_by: [user]
    window: 10m
    threshold: {files: 20}
    severity: high
long_rules:
  - name: trickle-30d
    kind: cumulative
    match: {min_label: confidential, destinations: [removable, cloud_sync]}
    measure: distinct_files
    window: 30d
    tiers: {medium: 15, high: 30}
  - name: trickle-90d
    kind: cumulative
    match: {min_label: confidential, destinations: [removable, cloud_sync]}
    measure: distinct_files
    window: 90d
    tiers: {medium: 25, high: 60}
  - name: baseline-weekly
    kind: baseline
    match: {min_label: confidential, destinations: [removable, cloud_sync, network_share]}
  - name: risk
    kind: risk
    match: {min_label: confidential, destinations: [removable, cloud_sync, network_share]}
    base_by_label: {confidential: 5, secret: 10}
    destination_factor: {removable: 2, cloud_sync: 2, network_share: 0.1}
    indicators: {first_seen_device: 10, off_hours: {points: 3, cap_per_day: 3},
                 coverage_gap_near: 10}
    tiers: {medium: 100, high: 150, critical: 250}
"""


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """The simulated world, shifted so that its six weeks end today, in a real store."""
    w, leaked = build(seed=7)
    today = time.time_ns() // DAY_NS
    shift = (today - (START + TEST_WEEKS * 7) + 1) // 7 * 7  # keep the weekdays
    data = tmp_path_factory.mktemp("data")
    with SqliteStore.open(data / DB_FILE):
        pass
    con = sqlite3.connect(data / DB_FILE)
    rows = [copy_row(e, i, shift) for i, e in enumerate(w.events)] + read_rows(w, shift)
    with con:
        con.executemany(INSERT, rows)
    con.close()
    (data / "policy.yaml").write_text(POLICY)
    expected = {(f.rule, f.user) for f in run(w) if f.kind is FindingKind.OPENED}
    since_days = (time.time_ns() // DAY_NS) - (START + shift) + 1
    return data, leaked, expected, since_days


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dry_run_finds_what_the_rules_would_and_touches_nothing(store_dir):
    data, leaked, expected, since_days = store_dir
    before = digest(data / DB_FILE)
    out = io.StringIO()
    argv = ["policy", "dry-run", "--data", str(data), "--policy", str(data / "policy.yaml"),
            "--since", f"{since_days}d", "--json"]  # fmt: skip
    assert main(argv, out) == 0
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    found = {(r["rule"], r["who"]) for r in rows}
    assert found == expected
    assert {who for _, who in found} == set(leaked)
    assert digest(data / DB_FILE) == before
    with SqliteStore.open(data / DB_FILE) as store:
        assert store.list_alerts() == []


def test_dry_run_text_names_each_rule(store_dir):
    data, _, _, since_days = store_dir
    out = io.StringIO()
    argv = ["policy", "dry-run", "--data", str(data), "--policy", str(data / "policy.yaml"),
            "--since", f"{since_days}d"]  # fmt: skip
    assert main(argv, out) == 0
    text = out.getvalue()
    assert "burst-10m: 0 alerts" in text
    assert "baseline-weekly: 3 alerts for 3" in text
    assert "real alerts untouched" in text


def test_dry_run_on_a_missing_store_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text(POLICY)
    rc = main(["policy", "dry-run", "--data", str(tmp_path), "--policy", str(tmp_path / "p.yaml")])
    assert rc == 1
    assert "no such store" in capsys.readouterr().err
