"""What the FedLoRA coordinator and workers share: the wire contract, the settings vocabulary, manifests,
chunking, aggregation, privacy and secure-aggregation math. No torch."""

from fedlora_common.plans import (
    Aggregation,
    AuditPlan,
    GoldfishPlan,
    LoraSpec,
    Mode,
    RecordDPPlan,
    RunSpec,
    TrainingPlan,
    TrainingSettings,
)

__all__ = [
    "Aggregation",
    "AuditPlan",
    "GoldfishPlan",
    "LoraSpec",
    "Mode",
    "RecordDPPlan",
    "RunSpec",
    "TrainingPlan",
    "TrainingSettings",
]
