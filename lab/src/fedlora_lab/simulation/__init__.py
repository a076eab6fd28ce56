"""The simulation engine: a federation's coordinator and every site's worker daemon in one process.

The deployment engine (`fedlora_lab.federation.LocalFederation`, or real machines) runs the same
code as separate processes over gRPC; here an in-process transport joins them, the sites take
turns on one loaded base model, and a run gives the same committed adapter.
"""

from fedlora_lab.simulation.engine import (
    Simulation,
    SimulationError,
    SimulationOutcome,
    SiteOutcome,
    check_sites,
    stretched,
)
from fedlora_lab.simulation.federation import SimulatedFederation
from fedlora_lab.simulation.link import InProcessClient
from fedlora_lab.simulation.shared_base import SharedBase
from fedlora_lab.simulation.turns import Turns, TurnsStopped

__all__ = [
    "InProcessClient",
    "SharedBase",
    "SimulatedFederation",
    "Simulation",
    "SimulationError",
    "SimulationOutcome",
    "SiteOutcome",
    "Turns",
    "TurnsStopped",
    "check_sites",
    "stretched",
]
