"""collector.trail: an append-only, hash-chained log; verify finds the first bad entry."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from collector.errors import TrailError
from collector.store import SqliteStore
from collector.trail import GENESIS, Action, Trail
from tests.collector.batches import T0


def fill(trail: Trail, n: int) -> None:
    for i in range(n):
        trail.append(
            None, actor="sam", action="alert_note", target=f"alert:{i % 2}",
            detail={"note_id": i, "text": "ok"}, now_ns=T0 + i,
        )  # fmt: skip


def expected_hash(prev: bytes, seq: int, at_ns: int, *texts: str) -> bytes:
    """The documented encoding, written out again: domain, then length-prefixed fields."""
    fields = [prev, seq.to_bytes(8, "big"), at_ns.to_bytes(8, "big")]
    fields += [t.encode() for t in texts]
    data = b"exfilwatch.trail.v1\x00" + b"".join(len(f).to_bytes(8, "big") + f for f in fields)
    return hashlib.sha256(data).digest()


def test_entries_chain_each_hash_to_the_one_before(store: SqliteStore) -> None:
    trail = Trail(store)
    first = trail.append(
        None, actor="dana", action=Action.USER_ADD, target="user:sam",
        detail={"role": "analyst", "a": [1, "é"]}, now_ns=T0,
    )  # fmt: skip
    second = trail.append(
        None, actor="sam", action="login", target="user:sam", detail={}, now_ns=T0 + 5
    )
    assert (first.seq, second.seq) == (1, 2)
    assert first.prev_hash == GENESIS and second.prev_hash == first.hash
    canonical = '{"a":[1,"\\u00e9"],"role":"analyst"}'  # sorted keys, compact, ASCII
    assert first.hash == expected_hash(GENESIS, 1, T0, "dana", "user_add", "user:sam", canonical)
    assert second.hash == expected_hash(first.hash, 2, T0 + 5, "sam", "login", "user:sam", "{}")
    assert dict(first.detail) == {"role": "analyst", "a": [1, "é"]}
    check = trail.verify()
    assert (check.ok, check.count, check.first_bad_seq) == (True, 2, None)
    assert check.message.endswith(second.hash.hex())


def test_empty_trail_verifies(store: SqliteStore) -> None:
    check = Trail(store).verify()
    assert (check.ok, check.count, check.first_bad_seq) == (True, 0, None)


def test_triggers_refuse_update_and_delete(store: SqliteStore, db_path: Path) -> None:
    fill(Trail(store), 2)
    with sqlite3.connect(db_path) as con:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            con.execute("UPDATE trail SET actor = 'mallory' WHERE seq = 1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            con.execute("DELETE FROM trail WHERE seq = 2")
    con.close()
    assert Trail(store).verify().ok


def tamper(db_path: Path, sql: str, params: tuple[object, ...] = ()) -> None:
    """What someone with the database file could do: drop the triggers, then edit."""
    with sqlite3.connect(db_path) as con:
        con.execute("DROP TRIGGER trail_no_update")
        con.execute("DROP TRIGGER trail_no_delete")
        con.execute(sql, params)
    con.close()


def test_a_byte_changed_in_a_row_names_that_entry(store: SqliteStore, db_path: Path) -> None:
    trail = Trail(store)
    fill(trail, 5)
    # One byte of entry 3's detail: "ok" -> "ox".
    tamper(db_path, "UPDATE trail SET detail = replace(detail, '\"ok\"', '\"ox\"') WHERE seq = 3")
    assert trail.entries(limit=5)[2].detail["text"] == "ox"
    check = trail.verify()
    assert (check.ok, check.count, check.first_bad_seq) == (False, 5, 3)
    assert "entry 3" in check.message and "changed" in check.message


@pytest.mark.parametrize(
    ("sql", "bad"),
    [
        ("UPDATE trail SET actor = 'mallory' WHERE seq = 2", 2),
        ("UPDATE trail SET at_ns = at_ns + 1 WHERE seq = 4", 4),
        ("UPDATE trail SET hash = zeroblob(32) WHERE seq = 1", 1),
        ("UPDATE trail SET action = 'login' WHERE seq = 5", 5),
        ("DELETE FROM trail WHERE seq = 3", 4),  # the entry after the hole
        ("UPDATE trail SET detail = 7 WHERE seq = 2", 2),
    ],
)
def test_any_edit_or_removal_in_the_middle_is_found(
    store: SqliteStore, db_path: Path, sql: str, bad: int
) -> None:
    trail = Trail(store)
    fill(trail, 5)
    tamper(db_path, sql)
    check = trail.verify()
    assert not check.ok and check.first_bad_seq == bad, check
    trail.entries()  # a damaged row still lists


def test_a_rehashed_entry_breaks_the_link_of_the_next(store: SqliteStore, db_path: Path) -> None:
    trail = Trail(store)
    fill(trail, 3)
    e = trail.entries(limit=3)[1]  # seq 2
    forged = expected_hash(e.prev_hash, 2, e.at_ns, "mallory", e.action, e.target, "{}")
    tamper(
        db_path,
        "UPDATE trail SET actor = 'mallory', detail = '{}', hash = ? WHERE seq = 2",
        (forged,),
    )
    check = trail.verify()
    assert (check.ok, check.first_bad_seq) == (False, 3)
    assert "does not link" in check.message


def test_append_commits_or_rolls_back_with_the_callers_transaction(store: SqliteStore) -> None:
    trail = Trail(store)
    with pytest.raises(RuntimeError), store._write() as con:
        trail.append(con, actor="sam", action="alert_note", target="alert:1", detail={}, now_ns=1)
        raise RuntimeError("the change it records failed")
    assert trail.entries() == []
    with store._write() as con:
        entry = trail.append(
            con, actor="sam", action="alert_note", target="alert:1", detail={}, now_ns=2
        )
    assert entry.seq == 1 and trail.entries() == [entry]


def test_bad_entries_are_refused(store: SqliteStore) -> None:
    trail = Trail(store)
    ok = {"actor": "sam", "target": "alert:1", "detail": {}, "now_ns": T0}
    with pytest.raises(TrailError, match="unknown trail action"):
        trail.append(None, **{**ok, "action": "delete_everything"})  # type: ignore[arg-type]
    with pytest.raises(TrailError, match="actor"):
        trail.append(None, **{**ok, "action": "login", "actor": " "})  # type: ignore[arg-type]
    with pytest.raises(TrailError, match="plain JSON"):
        trail.append(None, **{**ok, "action": "login", "detail": {"x": object()}})  # type: ignore[arg-type]
    con = sqlite3.connect(":memory:")
    with pytest.raises(TrailError, match="transaction"):
        trail.append(con, **{**ok, "action": "login"})  # type: ignore[arg-type]
    con.close()
    assert trail.verify().count == 0


def test_long_free_text_is_cut(store: SqliteStore) -> None:
    entry = Trail(store).append(
        None, actor="client:10.0.0.9", action="login_failed", target="user:" + "x" * 5000,
        detail={}, now_ns=T0,
    )  # fmt: skip
    assert len(entry.target) == 256 and entry.target.endswith("...")
    assert Trail(store).verify().ok


def test_entries_filter_and_page_newest_first(store: SqliteStore) -> None:
    trail = Trail(store)
    fill(trail, 7)  # targets alert:0 (seq 1,3,5,7) and alert:1 (seq 2,4,6)
    trail.append(None, actor="dana", action="login", target="user:dana", detail={}, now_ns=T0)
    assert [e.seq for e in trail.entries()] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert [e.seq for e in trail.entries(target="alert:0")] == [7, 5, 3, 1]
    assert [e.seq for e in trail.entries(target="alert:0", limit=2, before_seq=5)] == [3, 1]
    assert [e.seq for e in trail.entries(actor="dana")] == [8]
    assert [e.seq for e in trail.entries(actor="sam", target="alert:1", limit=1)] == [6]
    assert [e.seq for e in trail.history("alert:1")] == [2, 4, 6]  # oldest first


def test_writers_in_two_threads_and_two_stores_keep_one_chain(db_path: Path) -> None:
    """The CLI and the server write the same file; BEGIN IMMEDIATE orders their appends."""
    with SqliteStore.open(db_path) as a, SqliteStore.open(db_path) as b:
        start = threading.Barrier(2)

        def writer(store: SqliteStore, actor: str) -> None:
            start.wait()
            for i in range(40):
                Trail(store).append(
                    None, actor=actor, action="alert_note", target="alert:1",
                    detail={"i": i}, now_ns=T0 + i,
                )  # fmt: skip

        threads = [threading.Thread(target=writer, args=(s, n)) for s, n in ((a, "x"), (b, "y"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        check = Trail(a).verify()
        assert (check.ok, check.count) == (True, 80)
        mine = Trail(b).entries(actor="y", limit=99)
        assert sorted(json.dumps(dict(e.detail)) for e in mine) == sorted(
            json.dumps({"i": i}) for i in range(40)
        )
