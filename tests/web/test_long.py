"""Long-rule alert pages and the Rules page, in process: the measure against its tiers,
risk points that add up to the score, rule statistics, roles and escaping.

The alerts come from real signed batches through `Ingestor` (tests/web/conftest.py
`long_web`); expected numbers are recomputed here from the stored rows, not copied
from the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest
from starlette.testclient import TestClient

from collector.detection.risk import Contribution, RiskConfig, Term
from collector.models import AlertStatus
from collector.policy import Policy
from collector.web import chart, longview
from collector.web.app import create_app
from collector.web.reads import RuleActivity
from collector.web.views import rules as rules_view
from collector.web.views.longalert import long_view
from tests.web.conftest import (
    DAY,
    HOSTILE_RULE,
    HOSTILE_USER,
    LONG_NOW,
    ORIGIN,
    LongWeb,
    login,
)

HALF_LIFE = 14 * DAY
ESCAPED_RULE = "&#34;&gt;&lt;script&gt;alert(3)&lt;/script&gt;"
ESCAPED_USER = "&lt;img src=x onerror=alert(4)&gt;"


def details(web: LongWeb, alert_id: int) -> dict[str, object]:
    record = web.console.reader.alert_record(alert_id)
    assert record is not None
    doc = json.loads(record.details)
    assert isinstance(doc, dict)
    return doc


def evidence_rows(web: LongWeb, alert_id: int) -> list[tuple[str, int, str, int]]:
    """(event id, time, sha256, size) of an alert's evidence, read straight from SQLite."""
    with web.console.reader.connection() as con:
        return con.execute(
            "SELECT e.event_id, e.observed_at_ns, e.dest_sha256, e.dest_size FROM alert_events"
            " JOIN events e USING (event_id) WHERE alert_id = ? ORDER BY e.observed_at_ns",
            (alert_id,),
        ).fetchall()


def contributions(web: LongWeb, alert_id: int) -> list[tuple[str, int, str, float]]:
    with web.console.reader.connection() as con:
        return con.execute(
            "SELECT rc.event_id, rc.ts_ns, rc.term, rc.points FROM alert_events ae"
            " JOIN risk_contributions rc USING (event_id) WHERE ae.alert_id = ?"
            " ORDER BY rc.ts_ns, rc.rowid",
            (alert_id,),
        ).fetchall()


@pytest.fixture
def viewer(long_web: LongWeb) -> TestClient:
    client = long_web.client()
    login(client, "vic")
    return client


# -- the alert page -------------------------------------------------------------------


def test_cumulative_alert_draws_the_window_against_its_tiers(
    long_web: LongWeb, viewer: TestClient
) -> None:
    alert_id = long_web.alerts[("trickle-30d", "alice")]
    rows = evidence_rows(long_web, alert_id)
    # every evidence event lies within 30 days of the last: the window holds them all
    assert rows[-1][1] - rows[0][1] < 30 * DAY
    documents = len({sha for _, _, sha, _ in rows})
    html = viewer.get(f"/alerts/{alert_id}").text
    assert '<dd id="rule-kind">cumulative</dd>' in html
    assert html.count('class="threshold"') == 2  # medium 4 and high 8
    assert ">medium 4</text>" in html and ">high 8</text>" in html
    assert html.count('<path class="measure"') == 1
    latest = re.search(r'<dd id="latest">([^<]*)</dd>', html)
    assert latest and latest[1].startswith(f"{documents} distinct files in the 30d to ")
    assert f"{documents} documents" in latest[1]
    # first reached when the count of distinct documents got to the tier
    times = sorted(ts for _, ts, _, _ in rows)
    reached = dict(re.findall(r"<dt>reached ([^<]*)</dt>\s*<dd>([^<]*)</dd>", html))
    assert reached["medium 4"] == chart.utc(times[3]) and reached["high 8"] == chart.utc(times[7])
    # one dot per evidence event, and the line ends highest (the window only filled up)
    view = _view(long_web, alert_id)
    assert view.chart is not None and len(view.chart.dots) == len(rows)
    assert min(y for _, y in view.chart.dots) == view.chart.dots[-1][1]
    assert details(long_web, alert_id)["rule_kind"] == "cumulative"


def _view(web: LongWeb, alert_id: int) -> longview.LongView:
    alert = web.console.reader.alert(alert_id)
    record = web.console.reader.alert_record(alert_id)
    assert alert is not None and record is not None
    view = long_view(web.console, alert, record)
    assert view is not None
    return view


def test_risk_points_listed_add_up_to_the_score(long_web: LongWeb, viewer: TestClient) -> None:
    alert_id = long_web.alerts[("risk", "alice")]
    stored = contributions(long_web, alert_id)
    at = max(ts for _, ts, _, _ in stored)
    decayed = sum(p * 0.5 ** ((at - ts) / HALF_LIFE) for _, ts, _, p in stored)
    html = viewer.get(f"/alerts/{alert_id}").text
    assert "Points are listed as stored" in html and "half-life of 14d" in html
    assert f'id="stored-total">{sum(p for *_, p in stored):.2f}<' in html
    assert f'id="worth-total">{decayed:.2f}<' in html
    assert f'<strong id="score">{decayed:.1f}</strong>' in html
    # one row per term, every stored term listed
    terms = re.findall(r'<td>([^<]*)</td><td class="num">([0-9.]+)</td>', html)
    assert sorted((t, float(p)) for t, p in terms) == sorted((t, p) for _, _, t, p in stored)
    worth = [float(w) for w in re.findall(r'class="num worth">([0-9.]+)<', html)]
    assert sum(worth) == pytest.approx(decayed, abs=0.01 * len(worth))
    # the chart ends at the same score, and its tiers are the rule's
    view = _view(long_web, alert_id)
    assert view.risk is not None and view.risk.worth_total == pytest.approx(decayed)
    rule = next(r for r in long_web.console.policy.long_rules if r.name == "risk")
    assert rule.risk is not None
    history = long_web.console.reader.risk_history("risk", "alice", 0, at, alert_id=alert_id)
    assert longview.score_at(history, rule.risk, at) == pytest.approx(decayed)
    # and the page's arithmetic is the engine's: valued at the crossing event, the points
    # up to it make the score the alert recorded when it crossed
    doc = details(long_web, alert_id)
    crossing = str(doc["explanation"]).rsplit("crossing event ", 1)[1]
    crossed_at = next(ts for event_id, ts, _, _ in stored if event_id == crossing)
    upto = [_contribution(stored, e) for e in dict.fromkeys(e for e, *_ in stored)]
    upto = [c for c in upto if c.ts_ns <= crossed_at]
    table = longview.risk_table(upto, rule.risk, crossed_at)
    assert table.worth_total == pytest.approx(float(doc["value"]), abs=0.01)  # type: ignore[arg-type]


def _contribution(stored: list[tuple[str, int, str, float]], event_id: str) -> Contribution:
    mine = [(ts, term, p) for e, ts, term, p in stored if e == event_id]
    return Contribution(event_id, mine[0][0], tuple(Term(t, p) for _, t, p in mine))


def test_baseline_alert_shows_its_count_threshold_and_cold_start(
    long_web: LongWeb, viewer: TestClient
) -> None:
    alert_id = long_web.alerts[(HOSTILE_RULE, HOSTILE_USER)]
    doc = details(long_web, alert_id)
    assert "cold_start=true" in str(doc["explanation"])
    html = viewer.get(f"/alerts/{alert_id}").text
    assert '<dd id="rule-kind">baseline</dd>' in html
    assert 'id="cold-start"' in html and "fewer than 14" in html
    assert "cold_start=true, prior from org" in html  # the explanation, as the reason
    assert f">threshold {float(doc['threshold']):g}</text>" in html  # type: ignore[arg-type]
    # the bucket's count at the latest evidence event: its distinct documents in 7 days
    rows = evidence_rows(long_web, alert_id)
    last = rows[-1][1]
    bucket = {sha for _, ts, sha, _ in rows if last - 7 * DAY < ts <= last}
    assert f'<dd id="latest">{len(bucket)} distinct documents in the 7 days' in html


def test_a_burst_alert_keeps_its_own_page(long_web: LongWeb, viewer: TestClient) -> None:
    html = viewer.get(f"/alerts/{long_web.alert_id}").text
    assert 'id="measure"' not in html and "contributions" not in html
    assert '<section class="timeline" aria-label="timeline">' in html
    assert html.count('class="threshold"') == 1 and "threshold 20" in html


def test_an_alert_whose_rule_left_the_policy_shows_what_it_recorded(
    long_web: LongWeb,
) -> None:
    policy = long_web.console.policy
    bare = Policy(policy.revision, policy.labels, policy.rules, policy.agents, ())
    console = dataclasses.replace(long_web.console, policy=bare)
    with TestClient(create_app(console), base_url=ORIGIN, headers={"origin": ORIGIN},
                    follow_redirects=False) as client:  # fmt: skip
        login(client, "sam")
        risk = client.get(f"/alerts/{long_web.alerts[('risk', 'alice')]}").text
        cumulative = client.get(f"/alerts/{long_web.alerts[('trickle-30d', 'alice')]}").text
    stored = contributions(long_web, long_web.alerts[("risk", "alice")])
    total = sum(p for *_, p in stored)
    assert "has no risk rule of this name" in risk and "<svg" not in risk.split('id="files"')[0]
    assert "no decay is applied" in risk and f'id="worth-total">{total:.2f}<' in risk
    assert "has no cumulative rule of this name" in cumulative
    assert "alice: " in cumulative  # the explanation the alert recorded


# -- the Rules page -------------------------------------------------------------------


def _row(html: str, name_html: str) -> str:
    found = re.search(rf'<tr[^>]*>\s*<td class="rule-name"><a [^>]*>{re.escape(name_html)}</a>'
                      r".*?</tr>", html, re.S)  # fmt: skip
    assert found, name_html
    return found[0]


def _cell(row: str, name: str) -> str:
    found = re.search(rf'<td class="num {name}">(.*?)</td>', row, re.S)
    assert found, name
    return found[1]


def test_rules_page_lists_every_rule_with_weekly_counts_and_outcomes(long_web: LongWeb) -> None:
    triage, now = long_web.console.triage, LONG_NOW
    triage.set_status(long_web.alerts[("trickle-30d", "alice")], AlertStatus.RESOLVED,
                      actor="sam", reason="HR confirmed", now_ns=now)  # fmt: skip
    triage.set_status(long_web.alerts[("trickle-30d", HOSTILE_USER)], AlertStatus.FALSE_POSITIVE,
                      actor="sam", reason="project hand-over", now_ns=now)  # fmt: skip
    triage.set_status(long_web.alerts[("risk", "alice")], AlertStatus.RESOLVED,
                      actor="sam", reason="same case", now_ns=now)  # fmt: skip
    with long_web.client() as client:
        login(client, "vic")
        html = client.get("/rules").text
    policy = long_web.console.policy
    names = [r.name for r in policy.rules] + [r.name for r in policy.long_rules]
    assert len(re.findall(r'<td class="rule-name">', html)) == len(names) == 4
    since = LONG_NOW - 12 * 7 * DAY
    alerts = long_web.store.list_alerts()
    for name, escaped in [("bulk-copy-to-share", "bulk-copy-to-share"),
                          ("trickle-30d", "trickle-30d"), (HOSTILE_RULE, ESCAPED_RULE),
                          ("risk", "risk")]:  # fmt: skip
        row = _row(html, escaped)
        created = [a.created_at_ns for a in alerts if a.rule == name]
        weekly = [0] * 12
        for t in created:
            weekly[(t - since) // (7 * DAY)] += 1
        assert _cell(row, "raised") == str(len(created))
        assert f'<span class="weeks sr">{" ".join(map(str, weekly))}</span>' in row
        assert row.count('<rect class="week"') == 12
    trickle, risk = _row(html, "trickle-30d"), _row(html, "risk")
    assert (_cell(trickle, "confirmed"), _cell(trickle, "dismissed")) == ("1", "1")
    assert _cell(trickle, "effectiveness") == "50%"
    assert _cell(risk, "effectiveness") == "100%"
    assert _cell(_row(html, ESCAPED_RULE), "effectiveness") == "-"
    assert "20 files in 10m per user" in _row(html, "bulk-copy-to-share")
    assert "medium at 4, high at 8" in trickle and "half-life 14d" in risk


def test_rules_page_warns_about_a_rule_that_alerts_for_many_users(long_web: LongWeb) -> None:
    with long_web.client() as client:
        login(client, "sam")
        html = client.get("/rules").text
    recent = LONG_NOW - 30 * DAY
    with long_web.console.reader.connection() as con:
        seen = {u for (u,) in con.execute(
            "SELECT DISTINCT user FROM events WHERE observed_at_ns >= ?", (recent,))}  # fmt: skip
    assert f'<strong id="users-seen">{len(seen)}</strong>' in html
    users: dict[str, set[str]] = {}
    for a in long_web.store.list_alerts():
        users.setdefault(a.rule, set()).add(dict(a.group)["user"])
    noisy = {rule for rule, who in users.items() if len(who) / len(seen) > 0.15}
    assert noisy and "bulk-copy-to-share" not in noisy  # bob alone: 1 of 13
    warning = html.split('id="noisy"', 1)[1].split("</div>", 1)[0]
    for rule in users:
        escaped = ESCAPED_RULE if rule == HOSTILE_RULE else rule
        assert (escaped in warning) == (rule in noisy), rule
        assert ('class="noisy"' in _row(html, escaped).split(">", 1)[0]) == (rule in noisy)


def test_noisy_share_and_effectiveness_arithmetic(long_web: LongWeb) -> None:
    policy = long_web.console.policy
    activity = RuleActivity(
        weekly={"trickle-30d": [0] * 11 + [4], "risk": [1] * 12},
        confirmed={"trickle-30d": 3}, dismissed={"trickle-30d": 1, "risk": 2},
        users_alerted={"trickle-30d": 3, "risk": 4, "bulk-copy-to-share": 0},
        users_seen=20,
    )  # fmt: skip
    rows = {r.name: r for r in rules_view.rule_rows(policy, activity, 0)}
    assert rows["trickle-30d"].effectiveness == 0.75 and rows["risk"].effectiveness == 0.0
    assert rows[HOSTILE_RULE].effectiveness is None and rows[HOSTILE_RULE].raised == 0
    assert not rows["trickle-30d"].noisy  # exactly 15% is not more than 15%
    assert rows["risk"].noisy  # 20%
    tallest = max(b.height for b in rows["trickle-30d"].bars)
    assert tallest == rules_view.BARS_HEIGHT and rows["risk"].bars[0].height == 7.0
    nobody = dataclasses.replace(activity, users_seen=0)
    assert not any(r.noisy for r in rules_view.rule_rows(policy, nobody, 0))


# -- roles and escaping ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "audit"), [("vic", 403), ("sam", 200), ("ada", 200)])
def test_every_role_reads_rules_and_long_alerts_but_only_analysts_the_trail(
    long_web: LongWeb, name: str, audit: int
) -> None:
    with long_web.client() as client:
        login(client, name)
        rules = client.get("/rules")
        assert rules.status_code == 200 and '<a href="/rules" class="here">Rules</a>' in rules.text
        for alert_id in long_web.alerts.values():
            assert client.get(f"/alerts/{alert_id}").status_code == 200
        page = client.get("/audit")
        assert page.status_code == audit
        assert ('href="/audit"' in rules.text) == (audit == 200)
        if audit == 403:
            assert "analyst role" in page.text and "login_failed" not in page.text
        else:
            assert "Chain verified" in page.text


def test_a_failed_login_name_reaches_analysts_only(long_web: LongWeb) -> None:
    """What someone typed into the name field (here, a password) is in the trail."""
    with long_web.client() as client:
        form = client.get("/login").text
        token = re.search(r'name="csrf" value="([^"]*)"', form)
        assert token
        typed = {"name": "Tr0ub4dor&3-typed-as-name", "password": "x" * 12, "csrf": token[1]}
        assert client.post("/login", data=typed).status_code == 401
        login(client, "vic")
        assert "Tr0ub4dor" not in client.get("/audit").text
        assert "Tr0ub4dor" not in client.get("/audit?target=user:Tr0ub4dor%263-typed-as-name").text
    with long_web.client() as client:
        login(client, "sam")
        assert "Tr0ub4dor&amp;3-typed-as-name" in client.get("/audit").text


def test_hostile_user_and_rule_names_are_text(long_web: LongWeb, viewer: TestClient) -> None:
    pages = [viewer.get("/rules").text, viewer.get("/alerts").text]
    pages += [viewer.get(f"/alerts/{a}").text for a in long_web.alerts.values()]
    for html in pages:
        assert "<script>alert(3)" not in html and "<img src=x" not in html
        assert re.search(r"<script(?![^>]*\bsrc=)", html) is None
        assert " style=" not in html and "<style" not in html
    rules_html, alerts_html = pages[0], pages[1]
    assert ESCAPED_RULE in rules_html
    assert "rule=%22%3E%3Cscript%3Ealert%283%29%3C%2Fscript%3E" in rules_html
    assert ESCAPED_RULE in alerts_html  # the rule filter offers long rules too
    hostile = viewer.get(f"/alerts/{long_web.alerts[(HOSTILE_RULE, HOSTILE_USER)]}").text
    assert f'<span class="rule-name">{ESCAPED_RULE}</span>' in hostile
    assert f'<p class="reason-line" id="reason">{ESCAPED_USER}: ' in hostile


# -- the pure parts -------------------------------------------------------------------


def test_chart_draws_the_levels_up_to_the_first_one_not_reached() -> None:
    t0 = 1_700_000_000 * 10**9
    points = [(t0 + i * DAY, v) for i, v in enumerate([1.0, 5.0, 3.0])]
    levels = [("medium", 4.0), ("high", 8.0), ("critical", 100.0)]
    c = chart.build(points, levels, label=lambda v: f"{v:g}")
    assert c is not None
    assert [lv.label for lv in c.levels] == ["medium 4", "high 8"]
    assert c.above == ("critical 100",)
    ys = [y for _, y in c.dots]
    assert ys[1] < ys[2] < ys[0]  # SVG y grows downwards: 5 is highest
    assert c.path.count("L") == 4  # steps: across, then up or down, twice
    line = chart.build(points, levels, label=str, steps=False)
    assert line is not None and line.path.count("L") == 2
    assert chart.build([], levels, label=str) is None
    single = chart.build([(t0, 0.0)], [], label=str)
    assert single is not None and len(single.x_ticks) == 1


def test_a_long_risk_table_sums_what_it_does_not_list() -> None:
    config = RiskConfig(base_by_label={"secret": 10}, destination_factor={"removable": 1},
                        tiers=(("medium", 50.0),), half_life_ns=HALF_LIFE)  # fmt: skip
    t0 = 1_700_000_000 * 10**9
    many = [
        Contribution(f"e{i:04d}", t0 + i * 60 * 10**9, (Term("secret x removable", 1.0 + i % 7),))
        for i in range(longview.MAX_CONTRIBUTIONS + 40)
    ]
    table = longview.risk_table(many, config, many[-1].ts_ns)
    assert len(table.rows) == longview.MAX_CONTRIBUTIONS and table.hidden == 40
    listed = sum(r.worth for r in table.rows)
    assert listed + table.hidden_worth == pytest.approx(table.worth_total)
    assert table.worth_total == pytest.approx(longview.score_at(many, config, many[-1].ts_ns))
    assert min(r.worth for r in table.rows) >= table.hidden_worth / 40 - 1e-9
    assert [r.ts_ns for r in table.rows] == sorted(r.ts_ns for r in table.rows)


@pytest.mark.parametrize("half_life", [HALF_LIFE, None])
def test_the_score_series_is_the_score_at_each_time(half_life: int | None) -> None:
    rng = random.Random(6)
    config = RiskConfig(base_by_label={"secret": 10}, destination_factor={"removable": 1},
                        tiers=(("medium", 50.0),), half_life_ns=half_life,
                        max_age_ns=20 * DAY)  # fmt: skip
    t0 = 1_700_000_000 * 10**9
    stamps = sorted(t0 + rng.randrange(120 * DAY) for _ in range(400))
    many = [Contribution(f"e{i}", ts, (Term("t", rng.uniform(0.5, 20)),))
            for i, ts in enumerate(stamps)]  # fmt: skip
    times = sorted({*stamps[::3], t0 + 200 * DAY})  # the last: everything expired
    series = longview.score_series(many, config, times)
    expected = [longview.score_at(many, config, t) for t in times]
    assert series == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert series[-1] == 0.0


def test_details_of_other_alerts_are_not_long() -> None:
    assert longview.parse_details("") is None
    assert longview.parse_details('{"rule": "bulk", "format": 1}') is None
    assert longview.parse_details("[1, 2]") is None
    assert longview.parse_details("{not json") is None
    d = longview.parse_details('{"rule_kind": "risk", "value": 81.5, "threshold": 80}')
    assert d is not None and (d.value, d.threshold, d.explanation) == (81.5, 80.0, "")
