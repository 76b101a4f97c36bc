"""Anti-ram bollards and road blockers on Modbus PLCs, described by profiles: state, faults,
hydraulic pressure, the vehicle-presence interlock, and raise / lower / emergency raise."""

from drivers.modbus_bollard.config import BollardConfig
from drivers.modbus_bollard.driver import BollardDriver, Reading
from drivers.modbus_bollard.family import BollardFamily
from drivers.modbus_bollard.profile import BollardProfile, BollardState, Mode, load_profile

__all__ = [
    "BollardConfig",
    "BollardDriver",
    "BollardFamily",
    "BollardProfile",
    "BollardState",
    "Mode",
    "Reading",
    "load_profile",
]
