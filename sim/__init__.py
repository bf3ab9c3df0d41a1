"""Paper-scale simulator: aquad's own decision objects in virtual time.

See simulator.py for what is run and what is modelled; bench/paper_sim.py
runs the paper-style comparison.
"""

from .hardware import GPUS, GpuSpec, ServerSpec, load_server
from .simulator import POLICIES, Scenario, SimTenant, Simulation
from .workload import MODELS, Arrival, Costs, ModelSpec

__all__ = ["GPUS", "MODELS", "POLICIES", "Arrival", "Costs", "GpuSpec", "ModelSpec",
           "Scenario", "ServerSpec", "Simulation", "SimTenant", "load_server"]
