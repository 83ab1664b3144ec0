"""Sans-I/O cores of the long-horizon rules: cumulative windows, baselines, risk scores.

Each core is a pure function (or a small state machine) over values the storage
adapters fetch; time is always an argument. Semantics follow DETECTION-RULES.md
(shipped summary: docs/detection.md); departures are noted where they happen.
"""

from collector.detection.baseline import BaselineRule, BaselineVerdict, DayCount, Expectation
from collector.detection.cumulative import CumulativeRule, CumulativeVerdict, Measure, WindowEvent
from collector.detection.risk import Contribution, RiskConfig, RiskFacts, RiskTracker, Term

__all__ = [
    "BaselineRule",
    "BaselineVerdict",
    "Contribution",
    "CumulativeRule",
    "CumulativeVerdict",
    "DayCount",
    "Expectation",
    "Measure",
    "RiskConfig",
    "RiskFacts",
    "RiskTracker",
    "Term",
    "WindowEvent",
]
