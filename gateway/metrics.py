"""/metrics in the Prometheus text format, read from the gateway's live state at scrape time.

Nothing is counted twice: devices, uplinks, the outbox and the command service already
keep their counters; this module only renders them (prometheus-client's collector API).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from gateway.acks import Presence
from gateway.driver import LinkState

if TYPE_CHECKING:
    from gateway.app import Gateway

PREFIX = "campus_gateway"


class GatewayCollector:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self) -> Iterator[Any]:
        yield from self._devices()
        yield from self._events()
        yield from self._uplinks()
        yield from self._platforms()
        yield from self._commands()

    def _devices(self) -> Iterator[Any]:
        labels = ["device", "kind"]
        online = GaugeMetricFamily(f"{PREFIX}_device_online", "1 while the device answers", labels=labels)
        polls = CounterMetricFamily(f"{PREFIX}_polls", "polls (and camera health checks) made", labels=labels)
        errors = CounterMetricFamily(f"{PREFIX}_poll_errors", "polls that failed", labels=labels)
        latency = HistogramMetricFamily(
            f"{PREFIX}_poll_latency_seconds", "time a successful poll took", labels=labels
        )
        for d in self.gw.drivers:
            key = [d.device.id, d.device.kind.value]
            online.add_metric(key, 1.0 if d.status.state is LinkState.ONLINE else 0.0)
            polls.add_metric(key, d.status.polls)
            errors.add_metric(key, d.status.poll_errors)
            h = d.status.poll_latency
            cumulative, buckets = 0, []
            for bound, count in zip((*h.bounds, float("inf")), h.counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric(key, buckets, h.total)
        yield from (online, polls, errors, latency)

    def _events(self) -> Iterator[Any]:
        events = CounterMetricFamily(f"{PREFIX}_events", "events committed, by type", labels=["type"])
        pipeline = self.gw.pipeline
        if pipeline is not None:
            for event_type, n in sorted(pipeline.by_type.items()):
                events.add_metric([event_type], n)
        yield events

    def _uplinks(self) -> Iterator[Any]:
        pipeline = self.gw.pipeline
        depth = GaugeMetricFamily(
            f"{PREFIX}_outbox_depth", "events waiting for the broker's PUBACK", labels=["uplink"]
        )
        age = GaugeMetricFamily(
            f"{PREFIX}_outbox_oldest_age_seconds", "age of the oldest unsent event", labels=["uplink"]
        )
        connected = GaugeMetricFamily(f"{PREFIX}_uplink_connected", "1 while connected", labels=["uplink"])
        connects = CounterMetricFamily(
            f"{PREFIX}_uplink_connects", "connections made (reconnects)", labels=["uplink"]
        )
        published = CounterMetricFamily(f"{PREFIX}_uplink_published", "messages published", labels=["uplink"])
        latency = GaugeMetricFamily(
            f"{PREFIX}_publish_latency_seconds",
            "PUBACK latency of recent publishes",
            labels=["uplink", "quantile"],
        )
        for u in self.gw.uplinks:
            if pipeline is not None:
                depth.add_metric([u.name], pipeline.outbox.depth(u.name))
                age.add_metric([u.name], pipeline.outbox.oldest_age(u.name) or 0.0)
            connected.add_metric([u.name], 1.0 if u.state.value == "connected" else 0.0)
            connects.add_metric([u.name], u.stats.connects)
            published.add_metric([u.name], u.stats.published)
            recent = sorted(u.stats.publish_latencies)
            for q in (0.5, 0.99):
                if recent:
                    latency.add_metric([u.name, str(q)], recent[min(len(recent) - 1, int(q * len(recent)))])
        yield from (depth, age, connected, connects, published, latency)

    def _platforms(self) -> Iterator[Any]:
        """Presence of each uplink's platform and its acknowledgements of critical alarms."""
        presence = GaugeMetricFamily(
            f"{PREFIX}_platform_presence",
            "1 for the platform's current presence (disabled, unknown, online, offline)",
            labels=["uplink", "presence"],
        )
        awaiting = GaugeMetricFamily(
            f"{PREFIX}_alarms_awaiting_ack",
            "critical alarms the platform has not acknowledged",
            labels=["uplink"],
        )
        renotified = CounterMetricFamily(
            f"{PREFIX}_alarm_renotifications", "re-notifications of unacknowledged alarms", labels=["uplink"]
        )
        acked = CounterMetricFamily(
            f"{PREFIX}_alarm_acks", "alarms the platform acknowledged", labels=["uplink"]
        )
        expired = CounterMetricFamily(
            f"{PREFIX}_alarm_ack_expired", "alarms given up after renotify_limit repeats", labels=["uplink"]
        )
        for u in self.gw.uplinks:
            for state in Presence:
                presence.add_metric([u.name, state.value], 1.0 if u.presence.state is state else 0.0)
            if u.acks is not None:
                awaiting.add_metric([u.name], u.acks.pending)
                renotified.add_metric([u.name], u.acks.stats.renotified)
                acked.add_metric([u.name], u.acks.stats.acked)
                expired.add_metric([u.name], u.acks.stats.expired)
        yield from (presence, awaiting, renotified, acked, expired)

    def _commands(self) -> Iterator[Any]:
        commands = CounterMetricFamily(f"{PREFIX}_commands", "commands by final status", labels=["status"])
        service = self.gw.commands
        if service is not None:
            for status, n in sorted(service.results.items()):
                commands.add_metric([status], n)
        yield commands


def render(gw: Gateway) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gw))
    return generate_latest(registry), CONTENT_TYPE_LATEST
