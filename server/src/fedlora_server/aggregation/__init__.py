"""How updates combine into a round's mean: plainly or securely (what becomes of the mean is a `Strategy`)."""

from fedlora_server.aggregation.base import (
    Aggregate,
    AggregationFailed,
    Aggregator,
    Ask,
    AttemptPlan,
    Closing,
    KeyShares,
    Reveal,
    RoundAggregation,
    SecureMessage,
)
from fedlora_server.aggregation.plain import PlainAggregator, PlainRoundAggregation, Weighting
from fedlora_server.aggregation.secure import SecureAggregator, SecureRoundAggregation

__all__ = [
    "Aggregate",
    "AggregationFailed",
    "Aggregator",
    "Ask",
    "AttemptPlan",
    "Closing",
    "KeyShares",
    "PlainAggregator",
    "PlainRoundAggregation",
    "Reveal",
    "RoundAggregation",
    "SecureAggregator",
    "SecureMessage",
    "SecureRoundAggregation",
    "Weighting",
]
