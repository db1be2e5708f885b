"""Loopback simulators of the Services Manager and ShareFile APIs, scenario files and fleets."""

from simulators.faults import Faults
from simulators.fleet import generate_fleet
from simulators.scenario import DEMO_SCENARIO_PATH, Scenario, ScenarioCustomer, load_scenario
from simulators.servers import SimulatorServers

__all__ = [
    "DEMO_SCENARIO_PATH",
    "Faults",
    "Scenario",
    "ScenarioCustomer",
    "SimulatorServers",
    "generate_fleet",
    "load_scenario",
]
