"""Shared Modbus plumbing: one hub per physical link, reused by every Modbus driver family.

Usable from a REPL with no daemon::

    async with ModbusHub(TcpLink("10.0.0.5")) as hub:
        box = hub.unit(1, device_id="gate-box")
        print(await box.read_discrete_inputs(0, 8))
"""

from drivers.errorlog import RepeatedError
from drivers.modbus.hub import DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, HubState, HubStats, ModbusHub
from drivers.modbus.links import Link, SerialLink, TcpLink
from drivers.modbus.unit import UnitClient

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "HubState",
    "HubStats",
    "Link",
    "ModbusHub",
    "RepeatedError",
    "SerialLink",
    "TcpLink",
    "UnitClient",
]
