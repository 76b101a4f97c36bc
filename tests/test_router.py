from __future__ import annotations

import pytest

from gateway.config import RouteConfig
from gateway.events import DeviceKind, DeviceRef, Observation, Severity
from gateway.router import Route, Router

DEV = DeviceRef("d", DeviceKind.ALARM_BOX)


def obs(type_: str, severity: Severity) -> Observation:
    return Observation(DEV, type_, severity)


@pytest.mark.parametrize(
    ("route", "type_", "severity", "expected"),
    [
        (RouteConfig(), "alarm.panic", Severity.INFO, True),
        (RouteConfig(types=("alarm.*",)), "alarm.panic", Severity.CRITICAL, True),
        (RouteConfig(types=("alarm.*",)), "alarmx.panic", Severity.CRITICAL, False),
        (RouteConfig(types=("alarm.*",)), "device.offline", Severity.MAJOR, False),
        (RouteConfig(types=("alarm.panic",)), "alarm.panic.extra", Severity.MAJOR, False),
        (RouteConfig(min_severity=Severity.MAJOR), "device.offline", Severity.MAJOR, True),
        (RouteConfig(min_severity=Severity.MAJOR), "gateway.started", Severity.INFO, False),
        (RouteConfig(exclude=("gateway.*",)), "gateway.started", Severity.INFO, False),
        (RouteConfig(types=("*.offline", "alarm.*")), "device.offline", Severity.INFO, True),
    ],
)
def test_route_accepts(route: RouteConfig, type_: str, severity: Severity, expected: bool) -> None:
    assert Route.from_config("u", route).accepts(type_, severity) is expected


def test_router_targets_in_uplink_order_and_cached() -> None:
    router = Router(
        [
            Route.from_config("police", RouteConfig()),
            Route.from_config("education", RouteConfig(types=("alarm.*",), min_severity=Severity.MINOR)),
        ]
    )
    assert router.targets(obs("alarm.panic", Severity.CRITICAL)) == ("police", "education")
    assert router.targets(obs("gateway.started", Severity.INFO)) == ("police",)
    assert router.targets(obs("alarm.generic", Severity.INFO)) == ("police",)
    assert router.targets(obs("alarm.panic", Severity.CRITICAL)) == ("police", "education")
