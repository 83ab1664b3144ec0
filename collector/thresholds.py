"""Threshold engine, between store and alerts: sliding event-time windows per rule and group.

Sans-I/O: fed stored events with `now` passed in, it returns AlertOpened / EvidenceAdded decisions.
An event counts at its own time, or at `now` (the collector's receive time) if that is
earlier: a clock running ahead cannot hold a window open, nor stamp a burst out of one.
"""

from __future__ import annotations

import bisect
import logging
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, NamedTuple, assert_never, cast

from collector.models import (
    AlertOpened,
    EventId,
    EvidenceAdded,
    GroupKey,
    StoredEvent,
    ThresholdDecision,
)
from collector.policy import Dimension, Policy, Rule
from collector.reasons import ReasonParts

logger = logging.getLogger(__name__)

_MATCH_CACHE: Final = 4096
"""Most (label rank, action, destination class) combinations whose matching rules are kept."""

_VERBS: Final = MappingProxyType(
    {"copy": "copied", "move": "moved", "write": "wrote", "delete": "deleted", "rename": "renamed"}
)


def group_key(rule: Rule, event: StoredEvent) -> GroupKey:
    """The event's group under `rule`, e.g. (("user", "alice"), ("host", "lt-0412"))."""
    return _group_key(rule, group_values(rule)(event))


def _field(dim: Dimension) -> str:
    """The StoredEvent attribute a dimension groups by."""
    match dim:
        case Dimension.USER:
            return "user"
        case Dimension.HOST:
            return "host"
        case Dimension.DESTINATION:
            return "destination_key"
        case _:
            assert_never(dim)


def group_values(rule: Rule) -> Callable[[StoredEvent], object]:
    """The event's group values under `rule`, as the engine keys its groups: one
    attrgetter call (in C) returning the value, or a tuple of them for several dimensions.
    A flat key is built and hashed several times faster than the GroupKey; equal flat
    keys are equal GroupKeys. Make it once per rule, not per event."""
    return operator.attrgetter(*(_field(dim) for dim in rule.group_by))


def _group_key(rule: Rule, values: object) -> GroupKey:
    """The GroupKey of what `group_values(rule)` returned."""
    dims = [dim.value for dim in rule.group_by]
    if len(dims) == 1:
        return ((dims[0], str(values)),)
    parts = cast(tuple[object, ...], values)
    return tuple((dim, str(value)) for dim, value in zip(dims, parts, strict=True))


class _Entry(NamedTuple):
    """What the engine keeps of one matching event (built once per event, shared by rules)."""

    t: int
    event_id: EventId
    size: int
    rank: int
    action: str
    destination: str


@dataclass(slots=True)
class _Episode:
    """One hot stretch of a group: every window ending in [first_hot_ns, hot_until_ns) crosses.

    Its events (evidence) are those in (first_hot_ns - window, hot_until_ns). A crossing window
    ending exactly at hot_until_ns continues the stretch: there is no instant it was cool."""

    first_hot_ns: int
    hot_until_ns: int
    fresh: bool = False
    """Opened by the feed in progress: its AlertOpened is still to be emitted."""


class _Group:
    """State of one (rule, group): the newest matching events, sorted, and recent episodes.

    A plain class: one is made for every new user or host a rule sees, and a dataclass's
    default factories cost several times this __init__."""

    __slots__ = ("entries", "episodes", "ids", "key", "last_fed_ns", "parts", "prefix", "times")

    def __init__(self, key: GroupKey) -> None:
        self.key = key
        self.entries: list[_Entry] = []
        self.times: list[int] = []
        self.prefix: list[int] = [0]
        """prefix[i] - prefix[j] is the byte sum of entries[j:i]."""
        self.ids: set[EventId] = set()
        self.episodes: list[_Episode] = []
        """Sorted by first_hot_ns; their [first_hot_ns, hot_until_ns) never overlap."""
        self.last_fed_ns: int | None = None
        self.parts: dict[tuple[int, str, str], ReasonParts] = {}
        """How an event of (label rank, action, destination class) reads in this group's reason."""

    def insert(self, entry: _Entry) -> bool:
        """Insert in (time, id) order; True when the entry went last (in-order delivery)."""
        t = entry.t
        self.ids.add(entry.event_id)
        if not self.times or self.times[-1] < t or _order(self.entries[-1]) < _order(entry):
            self.entries.append(entry)
            self.times.append(t)
            self.prefix.append(self.prefix[-1] + entry.size)
            return True
        i = bisect.bisect(self.entries, _order(entry), key=_order)
        self.entries.insert(i, entry)
        self.times.insert(i, t)
        self.prefix.insert(i + 1, self.prefix[i] + entry.size)
        for j in range(i + 2, len(self.prefix)):
            self.prefix[j] += entry.size
        return False

    def drop_before(self, index: int) -> None:
        if index > 0:
            ids = self.ids
            for e in self.entries[:index]:
                ids.discard(e.event_id)
            del self.entries[:index], self.times[:index], self.prefix[:index]

    def bounds(self, end_ns: int, window_ns: int) -> tuple[int, int]:
        """Index range of the window (end_ns - window_ns, end_ns]."""
        times = self.times
        return bisect.bisect_right(times, end_ns - window_ns), bisect.bisect_right(times, end_ns)

    def hot_until(self, end_ns: int, rule: Rule) -> int | None:
        """If the window ending at end_ns crosses: when, absent new events, it stops crossing."""
        start, end = self.bounds(end_ns, rule.window_ns)
        files, size = rule.threshold.files, rule.threshold.bytes
        until: int | None = None
        if files is not None and end - start >= files:
            until = self.times[end - files] + rule.window_ns
        if size is not None and self.prefix[end] - self.prefix[start] >= size:
            k = bisect.bisect_right(self.prefix, self.prefix[end] - size) - 1
            by_bytes = self.times[k] + rule.window_ns
            until = by_bytes if until is None else max(until, by_bytes)
        return until

    def crosses_at_newest(self, rule: Rule) -> bool:
        """Whether the window ending at the newest retained event crosses the threshold."""
        times = self.times
        n = len(times)
        start = bisect.bisect_right(times, times[-1] - rule.window_ns)
        files, size = rule.threshold.files, rule.threshold.bytes
        return (files is not None and n - start >= files) or (
            size is not None and self.prefix[n] - self.prefix[start] >= size
        )

    def ends(self, from_ns: int, before_ns: int) -> Iterator[int]:
        """Distinct retained event times in [from_ns, before_ns), ascending."""
        times = self.times
        for i in range(bisect.bisect_left(times, from_ns), bisect.bisect_left(times, before_ns)):
            if i + 1 == len(times) or times[i + 1] != times[i]:
                yield times[i]

    def covering(self, t: int, window_ns: int) -> _Episode | None:
        for ep in reversed(self.episodes):
            if ep.first_hot_ns - window_ns < t < ep.hot_until_ns:
                return ep
        return None

    def fold(self, index: int) -> None:
        """Merge the episodes after `index` that its (extended) stretch now reaches or touches."""
        ep, eps = self.episodes[index], self.episodes
        while index + 1 < len(eps) and eps[index + 1].first_hot_ns <= ep.hot_until_ns:
            nxt = eps.pop(index + 1)
            ep.hot_until_ns = max(ep.hot_until_ns, nxt.hot_until_ns)
            ep.fresh = ep.fresh and nxt.fresh  # an alert already open keeps the stretch


class _Plan(NamedTuple):
    """A rule as `ThresholdEngine.feed` reads it for each event."""

    rule: Rule
    groups: dict[object, _Group]
    """The rule's groups, by `values` of their events."""
    values: Callable[[StoredEvent], object]
    window_ns: int
    files: int | None
    size: int | None
    """The threshold in bytes."""


def _order(entry: _Entry) -> tuple[int, EventId]:
    return entry.t, entry.event_id


class ThresholdEngine:
    """Applies a policy's rules to matching events; one instance per collector process.

    An event matches a rule when its action is one of the rule's actions, its label ranks at
    or above min_label (unlabelled or unlisted: never) and its destination class is listed.
    Windows are half-open on event time, (t - window, t]; a window crosses when its files
    or bytes reach the threshold. An event's time is its observed_at_ns, or `now` when that
    is earlier (an agent clock ahead of the collector's), so `now` must be the time the
    collector received the event (for a replay: when it was received then).

    A group's first crossing opens an alert (AlertOpened, with every in-window event as
    evidence). A later event before the episode's hot_until (or at it, when its window
    still crosses: there was no instant the group was cool) is EvidenceAdded and moves
    hot_until on; after that, a new crossing opens a new alert. Decisions carry the words
    of the alert's one-line reason (collector.reasons); the store renders it with the
    alert's totals, so the reason grows with its evidence.

    Memory: per (rule, group) only the newest events that can still decide are retained:
    the newest `files` events, or the shortest newest run whose bytes reach `bytes` if that
    is shorter, and nothing a window older than the newest event (or than `now`, if that is
    earlier). That is exactly what windows ending at or after the newest event need.

    Late events: an out-of-order event is inserted in time order and every window ending at
    a retained event at or after it is re-evaluated. Windows ending *before* the newest
    event, though, may miss events already dropped, so a late event is judged on fewer
    events than in-order delivery would have seen: it can miss a crossing, or see one hot
    stretch as two (never counting an event outside its window). The most exposed case is
    a group fed by several hosts (group_by without host) when one host uploads a backlog
    more than a window old; a backlog from one host alone is in order for its own groups.
    Duplicate event ids are recognised while the event is retained; the store's unique
    event id is the guard beyond that.
    """

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._rules = MappingProxyType({rule.name: rule for rule in policy.rules})
        self._min_rank = MappingProxyType(
            {rule.name: policy.label_rank(rule.match.min_label) for rule in policy.rules}
        )
        self._groups: Mapping[str, dict[object, _Group]] = MappingProxyType(
            {rule.name: {} for rule in policy.rules}
        )
        """Per rule, its groups by the `group_values` of their events; each keeps its GroupKey."""
        self._values = MappingProxyType({rule.name: group_values(rule) for rule in policy.rules})
        self._matching: dict[tuple[str, str, str], tuple[int, tuple[_Plan, ...]]] = {}
        """(label rank, matching rules) per (label, action, destination class), filled as seen."""

    def _match(
        self, label: str, action: str, destination_class: str
    ) -> tuple[int, tuple[_Plan, ...]]:
        """The label's rank and the rules an event with these fields matches, in policy
        order (none for most events)."""
        key = (label, action, destination_class)
        found = self._matching.get(key)
        if found is not None:
            return found
        rank = self._policy.label_rank(label)
        plans: tuple[_Plan, ...] = ()
        if rank is not None:
            plans = tuple(
                _Plan(
                    rule,
                    self._groups[rule.name],
                    self._values[rule.name],
                    rule.window_ns,
                    rule.threshold.files,
                    rule.threshold.bytes,
                )
                for rule in self._policy.rules
                if (min_rank := self._min_rank[rule.name]) is not None
                and rank >= min_rank
                and action in rule.match.actions
                and destination_class in rule.match.destinations
            )
        found = (-1 if rank is None else rank, plans)
        # Labels come from agents: bound what an agent inventing labels can make us keep.
        if len(self._matching) < _MATCH_CACHE:
            self._matching[key] = found
        return found

    def feed(self, event: StoredEvent, now_ns: int) -> list[ThresholdDecision]:
        """Account one stored event under every rule it matches; return the decisions."""
        found = self._matching.get((event.label, event.action, event.destination_class))
        if found is None:
            found = self._match(event.label, event.action, event.destination_class)
        rank, plans = found
        if not plans:
            return []
        t = event.observed_at_ns
        if t > now_ns:
            t = now_ns
        event_id = event.event_id
        size = event.size
        entry = _Entry(t, event_id, size, rank, event.action, event.destination_class)
        decisions: list[ThresholdDecision] = []
        for plan in plans:
            rule, groups, values, window, files, limit = plan
            value = values(event)
            group = groups.get(value)
            if group is None:
                group = groups[value] = _Group(_group_key(rule, value))
            elif event_id in group.ids:
                continue
            key = group.key
            if group.last_fed_ns is None or group.last_fed_ns < now_ns:
                group.last_fed_ns = now_ns
            times = group.times
            if not group.episodes and (not times or times[-1] < t):
                # Most events: in order, in a group that is not hot. Append, and unless the
                # window ending here crosses, only prune (what _evaluate and _prune would
                # do, inlined: this runs for nearly every event stored).
                group.ids.add(event_id)
                group.entries.append(entry)
                times.append(t)
                prefix = group.prefix
                total = prefix[-1] + size
                prefix.append(total)
                n = len(times)
                start = bisect.bisect_right(times, t - window)  # t <= now: the prune horizon
                if files is not None:
                    if n - start >= files:
                        decisions.extend(self._evaluate(rule, key, group, entry, True))
                        self._prune(rule, group, now_ns)
                        continue
                    keep = max(start, n - files)
                else:
                    keep = start
                if limit is not None:
                    if total - prefix[start] >= limit:
                        decisions.extend(self._evaluate(rule, key, group, entry, True))
                        self._prune(rule, group, now_ns)
                        continue
                    if total - prefix[0] >= limit:
                        keep = max(keep, bisect.bisect_right(prefix, total - limit) - 1)
                if keep > 0:
                    group.drop_before(keep)
                continue
            appended = group.insert(entry)
            if appended and not group.episodes and not group.crosses_at_newest(rule):
                self._prune(rule, group, now_ns)
                continue
            decided = self._evaluate(rule, key, group, entry, appended)
            if decided:
                decisions.extend(decided)
            self._prune(rule, group, now_ns)
        return decisions

    def expire(self, now_ns: int) -> None:
        """In groups not fed during the last window before `now`, drop what is a window old.

        A group fed within that window keeps its state even if its events are old, so a
        backlog uploaded over several batches is still counted together."""
        for name, groups in self._groups.items():
            horizon = now_ns - self._rules[name].window_ns
            for value, group in list(groups.items()):
                if group.last_fed_ns is not None and group.last_fed_ns > horizon:
                    continue
                group.drop_before(bisect.bisect_right(group.times, horizon))
                group.episodes = [ep for ep in group.episodes if ep.hot_until_ns > horizon]
                if not group.entries and not group.episodes:
                    del groups[value]

    def restore(
        self,
        alerts: Iterable[tuple[str, GroupKey, int]],
        events: Iterable[tuple[int, StoredEvent]],
    ) -> None:
        """Rebuild state after a restart, replacing any current state.

        `events`: (counted-at time, event) in time order, replayed silently; the time is the
        one the event was counted at when it arrived (observed, or received if earlier). At
        least each group's events any window ending at or after its newest one needs
        (collector.restore selects just those), or simply every event of the last
        policy.max_window_ns. `alerts`: (rule, group, hot_until_ns) of the alerts whose
        stretch may still be hot; each keeps its group's episode hot at least that long, so
        later events attach to it rather than open another alert."""
        for groups in self._groups.values():
            groups.clear()
        for t, event in events:
            self.feed(event, t)
        for name, key, hot_until in alerts:
            rule = self._rules.get(name)
            if rule is None:
                logger.info("open alert of rule %s, no longer in the policy, not restored", name)
                continue
            names = [dim.value for dim in rule.group_by]
            if [str(dim) for dim, _ in key] != names:
                logger.info("open alert of rule %s, grouped otherwise now, not restored", name)
                continue
            values = tuple(str(value) for _, value in key)
            flat = values[0] if len(values) == 1 else values
            group = self._groups[name].get(flat)
            if group is None:
                group = self._groups[name][flat] = _Group(_group_key(rule, flat))
            eps = group.episodes
            index = bisect.bisect_left(eps, hot_until, key=lambda ep: ep.first_hot_ns) - 1
            if index < 0:  # its crossing is older than the replayed events
                eps.insert(0, _Episode(hot_until - rule.window_ns, hot_until))
                index = 0
            eps[index].hot_until_ns = max(eps[index].hot_until_ns, hot_until)
            group.fold(index)

    def state_size(self) -> int:
        """Retained events plus episode records, over all rules and groups."""
        return sum(
            len(g.entries) + len(g.episodes) for gs in self._groups.values() for g in gs.values()
        )

    def _evaluate(
        self, rule: Rule, key: GroupKey, group: _Group, entry: _Entry, appended: bool
    ) -> list[ThresholdDecision]:
        """Re-evaluate the windows `entry` joined; decide for it and any event it made hot.

        `appended`: the entry is the group's newest, so the only window it joined that ends
        at a retained event is the one ending at its own time."""
        window = rule.window_ns
        if appended and group.episodes:
            # The common case of a hot group (a slow leak over a 30-day window makes every
            # later copy evidence): the newest event falls inside the newest stretch and
            # its window crosses. The stretch only grows at its end and no retained event
            # lies there yet, so the event itself is the only new evidence: what the
            # general path below finds, without its span bookkeeping.
            last = group.episodes[-1]
            if not last.fresh and last.first_hot_ns <= entry.t < last.hot_until_ns:
                until = group.hot_until(entry.t, rule)
                if until is not None:
                    if until > last.hot_until_ns:
                        last.hot_until_ns = until
                    parts = self._event_parts(rule, key, group, entry)
                    return [EvidenceAdded(rule.name, key, entry.event_id, last.hot_until_ns, parts)]
        old_spans = [(ep.first_hot_ns - window, ep.hot_until_ns) for ep in group.episodes]
        crossed = False
        ends = (entry.t,) if appended else group.ends(entry.t, entry.t + window)
        for end_ns in ends:
            until = group.hot_until(end_ns, rule)
            if until is None:
                continue
            crossed = True
            eps = group.episodes
            index = bisect.bisect_right(eps, end_ns, key=lambda ep: ep.first_hot_ns)
            if index and end_ns <= eps[index - 1].hot_until_ns:
                index -= 1  # inside a known stretch
            elif index < len(eps) and until >= eps[index].first_hot_ns:
                eps[index].first_hot_ns = end_ns  # a late event made the stretch start earlier
            else:
                eps.insert(index, _Episode(end_ns, until, fresh=True))
            eps[index].hot_until_ns = max(eps[index].hot_until_ns, until)
            group.fold(index)

        if not crossed:
            # No episode moved and none is fresh (fresh ones are emitted in the call that
            # made them): only the entry itself can be evidence, of a stretch it falls in.
            cover = group.covering(entry.t, window) if old_spans else None
            if cover is None:
                return []
            parts = self._event_parts(rule, key, group, entry)
            return [EvidenceAdded(rule.name, key, entry.event_id, cover.hot_until_ns, parts)]

        decisions: list[tuple[int, ThresholdDecision]] = []
        opened: set[EventId] = set()
        for ep in group.episodes:
            if ep.fresh:
                ep.fresh = False
                alert = self._opened(rule, key, group, ep)
                opened.update(alert.evidence)
                decisions.append((ep.first_hot_ns, alert))
        new_spans = [(ep.first_hot_ns - window, ep.hot_until_ns) for ep in group.episodes]
        candidates = {entry.event_id: entry}
        if new_spans != old_spans:
            candidates.update((e.event_id, e) for e in _newly_covered(group, old_spans, new_spans))
        for e in sorted(candidates.values(), key=_order):
            cover = group.covering(e.t, window)
            if cover is not None and e.event_id not in opened:
                until = cover.hot_until_ns
                parts = self._event_parts(rule, key, group, e)
                decisions.append((e.t, EvidenceAdded(rule.name, key, e.event_id, until, parts)))
        decisions.sort(key=lambda item: item[0])
        return [decision for _, decision in decisions]

    def _prune(self, rule: Rule, group: _Group, now_ns: int) -> None:
        """Keep only the newest events any window ending at or after the newest one needs."""
        times = group.times
        horizon = min(times[-1], now_ns) - rule.window_ns
        n = len(times)
        keep_from = bisect.bisect_right(times, horizon) if times[0] <= horizon else 0
        files, size = rule.threshold.files, rule.threshold.bytes
        budget = 0  # start of the shortest newest run that alone meets a criterion
        if files is not None:
            budget = max(budget, n - files)
        prefix = group.prefix
        if size is not None and prefix[n] - prefix[0] >= size:
            budget = max(budget, bisect.bisect_right(prefix, prefix[n] - size) - 1)
        group.drop_before(max(keep_from, budget))
        eps = group.episodes
        # Episodes are disjoint and sorted, so hot_until_ns ascends: check the oldest first.
        if eps and eps[0].hot_until_ns <= horizon:
            group.episodes = [ep for ep in eps if ep.hot_until_ns > horizon]

    def _opened(self, rule: Rule, key: GroupKey, group: _Group, ep: _Episode) -> AlertOpened:
        start, end = group.bounds(ep.first_hot_ns, rule.window_ns)
        window = group.entries[start:end]
        files, size = len(window), group.prefix[end] - group.prefix[start]
        parts = self._describe(rule, key, window)
        return AlertOpened(
            rule=rule.name,
            group=key,
            severity=rule.severity,
            evidence=tuple(e.event_id for e in window),
            files=files,
            bytes=size,
            first_ns=window[0].t,
            last_ns=window[-1].t,
            hot_until_ns=ep.hot_until_ns,
            reason=parts.render(files, size, window[0].t, window[-1].t),
            parts=parts,
        )

    def _event_parts(self, rule: Rule, key: GroupKey, group: _Group, entry: _Entry) -> ReasonParts:
        """How one evidence event reads in the reason (one object per kind of event)."""
        kind = (entry.rank, entry.action, entry.destination)
        parts = group.parts.get(kind)
        if parts is None:
            parts = group.parts[kind] = self._describe(rule, key, (entry,))
        return parts

    def _describe(self, rule: Rule, key: GroupKey, entries: Iterable[_Entry]) -> ReasonParts:
        """The reason's words for `entries`, e.g. "alice on lt-0412 copied ... confidential
        files ... to removable ...; rule bulk-copy-to-usb: 20 files / 100 MiB in 10m"."""
        values = dict(key)
        entries = tuple(entries)
        rank = max(e.rank for e in entries)
        return ReasonParts(
            rule=f"{rule.name}: {rule.describe()}",
            user=values.get("user"),
            host=values.get("host"),
            destination=values.get("destination"),
            label_rank=rank,
            label=self._policy.labels[rank],
            verbs=tuple(sorted({_VERBS.get(e.action, e.action) for e in entries})),
            destination_classes=tuple(sorted({e.destination for e in entries})),
        )


def _newly_covered(
    group: _Group, old: list[tuple[int, int]], new: list[tuple[int, int]]
) -> Iterator[_Entry]:
    """Retained entries inside a new span but no old one (spans are open intervals)."""
    old_closed = sorted((lo + 1, hi - 1) for lo, hi in old if hi - lo > 1)
    for lo, hi in new:
        cur, last = lo + 1, hi - 1
        for a, b in old_closed:
            if b < cur:
                continue
            if a > last:
                break
            if a > cur:
                yield from _between(group, cur, a - 1)
            cur = max(cur, b + 1)
        if cur <= last:
            yield from _between(group, cur, last)


def _between(group: _Group, first_ns: int, last_ns: int) -> list[_Entry]:
    times = group.times
    return group.entries[bisect.bisect_left(times, first_ns) : bisect.bisect_right(times, last_ns)]
