"""Driver families by name, found through the ``campus_gateway.drivers`` entry-point group.

The core never imports a driver module by name; a third-party family is added by
installing a distribution that declares an entry point in this group.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from gateway.driver import DriverFamily

GROUP = "campus_gateway.drivers"


@functools.cache
def families() -> dict[str, type[DriverFamily]]:
    found: dict[str, type[DriverFamily]] = {}
    for ep in entry_points(group=GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, DriverFamily)):
            raise TypeError(f"entry point {ep.name} = {ep.value} is not a DriverFamily")
        found[ep.name] = cls
    return found


def family(name: str) -> type[DriverFamily] | None:
    return families().get(name)
