"""A platform-side test subscriber: persistent session, QoS 1, every message kept in order."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def stop_paho(client: mqtt.Client) -> None:
    """Disconnect a client run with ``loop_start`` and close every socket it opened.

    ``loop_start`` opens a loopback socket pair to wake its thread, and paho closes it only in
    ``Client.__del__``. A client whose callbacks point back at their owner sits in a reference
    cycle, and the cycle collector finalizes its members in any order, so the sockets may be
    finalized before ``__del__`` closes them: a ResourceWarning in whichever later test runs
    ``gc.collect()``. Closing them here keeps each test's sockets inside that test.
    """
    client.disconnect()
    client.loop_stop()
    client._reset_sockets()  # paho has no public close for the wake-up pair


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float = field(default_factory=time.time)

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """Subscribes with a persistent session (clean_session False) so nothing queued is lost."""

    def __init__(self, port: int, topic: str = "#", client_id: str | None = None) -> None:
        self.port = port
        self.topic = topic
        self.messages: list[Received] = []
        self.connects: list[tuple[float, bool, str]] = []  # (when, session present, reason code)
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-sub-{uuid.uuid4().hex[:8]}",
            clean_session=False,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(0.05, 0.5)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connects.append((time.time(), bool(flags.session_present), str(rc)))
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def start(self, timeout: float = 10.0) -> Subscriber:
        self.client.connect("127.0.0.1", self.port, keepalive=5)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            raise TimeoutError("subscription not acknowledged")
        return self

    def stop(self) -> None:
        stop_paho(self.client)

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def events(self, type_prefix: str = "") -> list[dict[str, Any]]:
        with self._cond:
            out = []
            for m in self.messages:
                if "/events/" not in m.topic:
                    continue
                body = m.json()
                if body["type"].startswith(type_prefix):
                    out.append(body)
            return out

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> Any:
        """Wait until ``predicate(messages)`` is truthy; return its value. Bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate(self.messages)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"condition not met within {timeout} s; got {len(self.messages)} messages"
                    )
                self._cond.wait(min(left, 0.1))

    def wait_event(self, type_: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        def find(msgs: list[Received]) -> dict[str, Any] | None:
            for m in msgs:
                if "/events/" in m.topic:
                    body = m.json()
                    if body["type"] == type_ and all(body.get(k) == v for k, v in match.items()):
                        return body  # type: ignore[no-any-return]
            return None

        return self.wait_for(find, timeout)  # type: ignore[no-any-return]


async def await_event(sub: Subscriber, type_: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
    """``wait_event`` from async code without blocking the event loop (simulators live on it)."""
    import asyncio

    return await asyncio.to_thread(sub.wait_event, type_, timeout, **match)


async def await_for(sub: Subscriber, predicate: Any, timeout: float = 10.0) -> Any:
    import asyncio

    return await asyncio.to_thread(sub.wait_for, predicate, timeout)
