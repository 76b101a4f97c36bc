"""Modbus alarm boxes: one-button emergency alarms, perimeter zones, tamper and end-of-line
supervision on Modbus TCP / RTU I/O modules, described by profiles (register maps as data)."""

from drivers.liveness import Presence
from drivers.modbus_alarm.config import AlarmBoxConfig, ZoneOverride
from drivers.modbus_alarm.driver import AlarmBoxDriver
from drivers.modbus_alarm.family import AlarmBoxFamily
from drivers.modbus_alarm.profile import Profile, load_profile
from drivers.modbus_alarm.zones import ZoneType

__all__ = [
    "AlarmBoxConfig",
    "AlarmBoxDriver",
    "AlarmBoxFamily",
    "Presence",
    "Profile",
    "ZoneOverride",
    "ZoneType",
    "load_profile",
]
