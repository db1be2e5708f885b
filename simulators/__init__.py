"""Loopback simulators of the Services Manager and ShareFile APIs, scenario files and fleets."""

from simulators.faults import Faults
from simulators.fleet import generate_fleet
from simulators.scenario import DEMO_SCENARIO_PATH, Scenario, ScenarioCustomer, load_scenario
from simulators.servers import SimulatorServers
from simulators.sharefile_app import SHAREFILE_PAGE_SIZE

__all__ = [
    "DEMO_SCENARIO_PATH",
    "SHAREFILE_PAGE_SIZE",
    "Faults",
    "Scenario",
    "ScenarioCustomer",
    "SimulatorServers",
    "generate_fleet",
    "load_scenario",
]
