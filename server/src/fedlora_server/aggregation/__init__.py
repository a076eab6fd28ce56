"""How updates combine: plainly, securely, or with central DP noise around either."""

from fedlora_server.aggregation.base import (
    Aggregate,
    AggregationFailed,
    Aggregator,
    Ask,
    AttemptPlan,
    KeyShares,
    Reveal,
    RoundAggregation,
    SecureMessage,
)
from fedlora_server.aggregation.noise import CentralNoise
from fedlora_server.aggregation.plain import PlainAggregator, PlainRoundAggregation, Weighting
from fedlora_server.aggregation.secure import SecureAggregator, SecureRoundAggregation

__all__ = [
    "Aggregate",
    "AggregationFailed",
    "Aggregator",
    "Ask",
    "AttemptPlan",
    "CentralNoise",
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
