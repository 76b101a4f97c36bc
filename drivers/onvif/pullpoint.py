"""A pull-point subscription's life: create, long-poll, renew, unsubscribe; never two at once.

onvif-zeep-async's own PullPointManager renews on a timer of its own and, after a failed
renew, creates a new subscription without removing the old one (cameras that allow few
subscribers then refuse the new one). This one owns the whole cycle in the driver's task:

    SUBSCRIBING -> ACTIVE (pull, pull, ... renew at half-life) -> CLOSING -> (gone)

Any failure (a fault on PullMessages or Renew after a reboot, a dropped connection)
ends the subscription: it is unsubscribed where the camera still answers, and the
caller starts over, after a capped backoff, with a fresh session.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from drivers.onvif.session import CameraSession
from gateway.errors import DeviceProtocolError, DriverError

log = structlog.get_logger(__name__)

# Messages per pull: a burst of analytics events (a crowd at the gate) drains in a few pulls.
MESSAGE_LIMIT = 100
# Renew at half the subscription's life: a renew that fails (camera busy) is retried by the
# next pull's check long before the camera drops the subscription.
RENEW_AT = 0.5
# Unsubscribing is a courtesy (the subscription expires anyway): 2 s, so a dead camera
# does not hold up the restart.
UNSUBSCRIBE_TIMEOUT = 2.0


class PullPointState(enum.StrEnum):
    IDLE = "idle"  # no subscription (not started, or between attempts)
    SUBSCRIBING = "subscribing"
    ACTIVE = "active"  # pulling
    RENEWING = "renewing"
    CLOSING = "closing"  # unsubscribing after a failure or at shutdown


class PullPoint:
    """One subscription on one session; :meth:`run` pulls until a failure or cancellation."""

    def __init__(self, session: CameraSession, seconds: int, pull_timeout: float) -> None:
        self.session = session
        self.seconds = seconds
        self.pull_timeout = pull_timeout
        self.state = PullPointState.IDLE
        self.renewed_at: float | None = None
        self.messages = 0
        self._subscription: Any = None  # the subscription manager service (Renew, Unsubscribe)
        self._pullpoint: Any = None  # the pull-point service (PullMessages)
        self._renew_due = 0.0

    async def run(self, on_message: Callable[[Any], Awaitable[None]]) -> None:
        """Subscribe, then pull and renew until a DriverError (raised after unsubscribing)."""
        loop = asyncio.get_running_loop()
        try:
            await self._subscribe()
            while True:
                if loop.time() >= self._renew_due:
                    await self._renew()
                for message in await self._pull():
                    self.messages += 1
                    await on_message(message)
        finally:
            await self._unsubscribe()

    async def _subscribe(self) -> None:
        self.state = PullPointState.SUBSCRIBING
        cam = self.session.camera
        events = await self.session.call("events service", cam.create_events_service())
        result = await self.session.call(
            "CreatePullPointSubscription",
            events.CreatePullPointSubscription({"InitialTerminationTime": f"PT{self.seconds}S"}),
        )
        address = _address(result)
        if not address.startswith(("http://", "https://")):
            # The camera made a subscription we cannot address: it expires by itself.
            raise DeviceProtocolError(
                self.session.device_id,
                f"CreatePullPointSubscription: no usable subscription address ({address!r})",
            )
        cam.xaddrs["http://www.onvif.org/ver10/events/wsdl/PullPointSubscription"] = cam.rewrite_url(address)
        self._subscription = await self.session.call(
            "subscription service", cam.create_subscription_service("PullPointSubscription")
        )
        self._pullpoint = await self.session.call("pull-point service", cam.create_pullpoint_service())
        self._renew_due = asyncio.get_running_loop().time() + self.seconds * RENEW_AT
        self.state = PullPointState.ACTIVE
        log.debug("subscribed", device=self.session.device_id, address=address)

    async def _pull(self) -> list[Any]:
        answer = await self.session.call(
            "PullMessages",
            self._pullpoint.PullMessages(
                {"Timeout": dt.timedelta(seconds=self.pull_timeout), "MessageLimit": MESSAGE_LIMIT}
            ),
            timeout=self.pull_timeout + self.session.timeout,
        )
        return list(getattr(answer, "NotificationMessage", None) or [])

    async def _renew(self) -> None:
        self.state = PullPointState.RENEWING
        await self.session.call("Renew", self._subscription.Renew(f"PT{self.seconds}S"))
        now = asyncio.get_running_loop().time()
        self.renewed_at = now
        self._renew_due = now + self.seconds * RENEW_AT
        self.state = PullPointState.ACTIVE

    async def _unsubscribe(self) -> None:
        if self._subscription is None:
            self.state = PullPointState.IDLE
            return
        self.state = PullPointState.CLOSING
        try:
            await self.session.call(
                "Unsubscribe", self._subscription.Unsubscribe(), timeout=UNSUBSCRIBE_TIMEOUT
            )
        except DriverError as exc:  # the camera rebooted or went away: its side is gone already
            log.debug("unsubscribe failed", device=self.session.device_id, error=str(exc))
        finally:
            self._subscription = self._pullpoint = None
            self.state = PullPointState.IDLE


def _address(result: Any) -> str:
    """The subscription reference address of a CreatePullPointSubscription answer ('' if none)."""
    reference = getattr(result, "SubscriptionReference", None)
    address = getattr(reference, "Address", None)
    value = getattr(address, "_value_1", address)  # zeep's text of an AnyURI
    return value.strip() if isinstance(value, str) else ""
