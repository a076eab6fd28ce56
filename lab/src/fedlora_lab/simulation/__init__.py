"""The simulation engine: a federation's coordinator and every site's worker daemon in one process.

The deployment engine (`fedlora_lab.federation.LocalFederation`, or real machines) runs the same
code as separate processes over gRPC; here an in-process transport joins them, the sites train at
once, each on its own copy of one loaded base model, and a run gives the same committed adapter.
"""

from fedlora_lab.simulation.clock import ContendedClock
from fedlora_lab.simulation.engine import (
    Simulation,
    SimulationError,
    SimulationOutcome,
    SiteOutcome,
    check_sites,
)
from fedlora_lab.simulation.federation import SimulatedFederation
from fedlora_lab.simulation.link import InProcessClient
from fedlora_lab.simulation.side_by_side import SideBySide, draws_randomness
from fedlora_lab.simulation.site_models import SiteModels, own_copy

__all__ = [
    "ContendedClock",
    "InProcessClient",
    "SideBySide",
    "SimulatedFederation",
    "Simulation",
    "SimulationError",
    "SimulationOutcome",
    "SiteModels",
    "SiteOutcome",
    "check_sites",
    "draws_randomness",
    "own_copy",
]
