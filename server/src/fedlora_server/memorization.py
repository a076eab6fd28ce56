"""The run's memorization for one round, from the sites' stored audit reports."""

from __future__ import annotations

import json
from collections.abc import Sequence

from fedlora_common.memorization import CombinedMemorization, combine, memorization_from_json
from fedlora_server.store import MetricsRecord

__all__ = ["combine_reports"]


def combine_reports(reports: Sequence[MetricsRecord]) -> CombinedMemorization | None:
    """`combine` over the sites' stored reports that carry an audit."""
    return combine([memorization_from_json(json.loads(m.memorization_json)) for m in reports if m.memorization_json])
