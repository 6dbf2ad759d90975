"""What a node counts, and how it is shown: Prometheus metrics and the ``/api/stats`` figures.

The core calls a small interface (:class:`Counters`, :meth:`Metrics.observe_fanout`,
:meth:`Metrics.observe_round_trip`, :meth:`Metrics.watch_proxy`,
:meth:`Metrics.watch_webhooks`); everything about names, labels and exposition lives here.

Cost: counters are plain integers on a ``__slots__`` object, bumped once per fan-out batch or
per event (never per recipient); gauges that mirror state the node already holds (connections,
subscriptions, channels, buffered bytes) are read when scraped, not kept up to date per event.
Each node has a :class:`~prometheus_client.CollectorRegistry` of its own (several apps live in
one test process; nothing is registered globally).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .hub import Hub
    from .proxy import BackendProxy
    from .webhooks.service import Webhooks

# The content type of the text exposition format that generate_latest writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TRANSPORTS = ("websocket", "polling")
# Busiest channels a node reports (in its heartbeat) and /api/stats lists.
TOP_CHANNELS = 20

# Why sessions close, as labels: the close reasons of the engine, session and transports, by
# their stable first words (a protocol error carries its details in parentheses). Anything
# else is "other", so that a label can never take unbounded values.
DISCONNECT_REASONS = {
    "client closed": "client_closed",
    "transport close": "transport_close",
    "transport error": "transport_error",
    "client namespace disconnect": "client_disconnect",
    "ping timeout": "ping_timeout",
    "no Socket.IO connect": "no_connect",
    "slow": "slow",
    "rate limited": "rate_limited",
    "token expired": "token_expired",
    "disconnected by the server": "server_disconnect",
    "server draining": "draining",
    "server shutting down": "shutdown",
    "payload over the limit": "too_large",
    "protocol error": "protocol_error",
    "internal error": "internal_error",
}

# Seconds: a Redis round trip on a LAN is ~0.1-1 ms; fan-out batches range wider.
ROUND_TRIP_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
FANOUT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                  0.1, 0.25, 1.0)
# A backend proxy call is an HTTP request to the app: milliseconds, up to --proxy-timeout.
PROXY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PROXY_CALLS = ("connect", "subscribe", "publish")
PROXY_OUTCOMES = ("answered", "refused", "unavailable")


def disconnect_reason(reason: str) -> str:
    """The label of a close ``reason``: one of :data:`DISCONNECT_REASONS`' values or ``other``."""
    label = DISCONNECT_REASONS.get(reason)
    if label is None:
        label = DISCONNECT_REASONS.get(reason.split(" (", 1)[0], "other")
    return label


class Counters:
    """The node's counters since it started: plain integers, bumped by the core.

    ``publications``: publications this node made (each accepted by the broker once, so the
    sum over nodes is the deployment's); ``deliveries``: publications handed to local
    subscribers (one per publication and recipient, added once per fan-out batch);
    ``disconnects``: closed sessions by :func:`disconnect_reason` label; ``errors``: errors
    sent to clients (acks and HTTP answers) by code; ``broker_reconnects``: times the broker
    reconnected to Redis after losing it.
    """

    __slots__ = ("publications", "deliveries", "broker_reconnects", "disconnects", "errors")

    def __init__(self) -> None:
        self.publications = 0
        self.deliveries = 0
        self.broker_reconnects = 0
        self.disconnects: dict[str, int] = {}
        self.errors: dict[str, int] = {}

    def disconnected(self, reason: str) -> str:
        """Count a session closed for ``reason``; return its label."""
        label = disconnect_reason(reason)
        self.disconnects[label] = self.disconnects.get(label, 0) + 1
        return label

    def error(self, code: str) -> None:
        """Count an error sent to a client (an ack or an HTTP answer) with ``code``."""
        self.errors[code] = self.errors.get(code, 0) + 1


def transport_counts(sessions: Iterable[Any]) -> dict[str, int]:
    """Connected sessions by transport name (``websocket``, ``polling``)."""
    counts = dict.fromkeys(TRANSPORTS, 0)
    for session in sessions:
        name = getattr(session, "transport_name", "websocket")
        if name in counts:
            counts[name] += 1
    return counts


def buffered_bytes(sessions: Iterable[Any]) -> int:
    """Bytes written to the sessions' transports that their clients have not taken yet."""
    total = 0
    for session in sessions:
        transport = getattr(session, "transport", None)
        if transport is not None:
            total += transport.buffered_bytes
    return total


class Metrics:
    """A node's counters, histograms and the Prometheus registry that exposes them."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.counters = hub.counters  # the hub's fan-out adds to them
        self.started_at = time.monotonic()
        self.registry = CollectorRegistry(auto_describe=True)
        self.fanout_seconds = Histogram(
            "realtime_fanout_seconds", "Seconds one batch of publications took to fan out "
            "to this node's subscribers", buckets=FANOUT_BUCKETS, registry=self.registry)
        self.broker_round_trip_seconds = Histogram(
            "realtime_broker_round_trip_seconds", "Seconds of the node's round trips to Redis",
            buckets=ROUND_TRIP_BUCKETS, registry=self.registry)
        self.registry.register(_StateCollector(self))

    def observe_fanout(self, seconds: float) -> None:
        """One fan-out batch took ``seconds``."""
        self.fanout_seconds.observe(seconds)

    def observe_round_trip(self, seconds: float) -> None:
        """One round trip to Redis took ``seconds``."""
        self.broker_round_trip_seconds.observe(seconds)

    def watch_proxy(self, proxy: BackendProxy) -> None:
        """Count and time ``proxy``'s calls: ``realtime_proxy_calls_total{call, outcome}``
        (outcome ``answered``, ``refused`` or ``unavailable``) and
        ``realtime_proxy_call_seconds{call}``."""
        calls = Counter("realtime_proxy_calls", "Backend proxy calls, by call and outcome "
                        "(answered, refused, unavailable)", ["call", "outcome"],
                        registry=self.registry)
        seconds = Histogram("realtime_proxy_call_seconds", "Seconds a backend proxy call took",
                            ["call"], buckets=PROXY_BUCKETS, registry=self.registry)
        for call in PROXY_CALLS:  # every series from the start, at 0
            seconds.labels(call)
            for outcome in PROXY_OUTCOMES:
                calls.labels(call, outcome)

        def on_call(call: str, outcome: str, elapsed: float) -> None:
            calls.labels(call, outcome).inc()
            seconds.labels(call).observe(elapsed)

        proxy.on_call = on_call

    def watch_webhooks(self, webhooks: Webhooks) -> None:
        """Show the webhooks' counters: events sent and dropped, POSTs that failed."""
        self.registry.register(_WebhookCollector(webhooks))

    def broker_reconnected(self) -> None:
        """The broker's delivery reconnected to Redis after losing it."""
        self.counters.broker_reconnects += 1

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def uptime(self) -> float:
        return round(time.monotonic() - self.started_at, 3)

    def snapshot(self) -> dict[str, Any]:
        """This node's ``/api/stats`` figures, taken now (without ``node``; see
        :func:`node_stats`), plus ``top``: its busiest channels as ``[channel, subscribers]``.

        Small enough to travel in every heartbeat: at most :data:`TOP_CHANNELS` channels.
        """
        hub, counters = self.hub, self.counters
        sessions = hub.sessions()
        return {
            "uptime": self.uptime(),
            "connections": len(sessions),
            "transports": transport_counts(sessions),
            "subscriptions": hub.subscription_count,
            "channels": hub.channel_count,
            "publications": counters.publications,
            "deliveries": counters.deliveries,
            "disconnects": dict(counters.disconnects),
            "updated": round(time.time(), 3),
            "top": [list(item) for item in hub.busiest_channels(TOP_CHANNELS)],
        }


def node_stats(node_id: str, snapshot: dict[str, Any]) -> dict[str, Any]:
    """One entry of ``/api/stats``' ``nodes``: ``snapshot`` without its channels, named."""
    entry = {"node": node_id}
    entry.update((key, value) for key, value in snapshot.items() if key != "top")
    return entry


def merge_stats(snapshots: dict[str, dict[str, Any]], now: float | None = None,
                limit: int = TOP_CHANNELS) -> dict[str, Any]:
    """The ``/api/stats`` answer from the snapshots of every live node (by node id).

    A channel's subscribers are summed over the nodes that reported it among their busiest;
    the ``limit`` busiest are listed, busiest first (ties by name).
    """
    subscribers: dict[str, int] = {}
    for snapshot in snapshots.values():
        for channel, count in snapshot.get("top", ()):
            subscribers[channel] = subscribers.get(channel, 0) + count
    busiest = heapq.nlargest(limit, subscribers.items(), key=lambda item: (item[1], item[0]))
    busiest.sort(key=lambda item: (-item[1], item[0]))
    return {
        "time": round(time.time() if now is None else now, 3),
        "nodes": [node_stats(node_id, snapshots[node_id]) for node_id in sorted(snapshots)],
        "channels": [{"channel": channel, "subscribers": count} for channel, count in busiest],
    }


class _StateCollector(Collector):
    """The counters and the gauges read from the hub, at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        hub, counters = self.metrics.hub, self.metrics.counters
        sessions = hub.sessions()
        connections = GaugeMetricFamily("realtime_connections",
                                        "Connected clients, by transport", labels=["transport"])
        for transport, count in transport_counts(sessions).items():
            connections.add_metric([transport], count)
        yield connections
        yield GaugeMetricFamily("realtime_subscriptions", "Client subscriptions (one per "
                                "connection and channel)", value=hub.subscription_count)
        yield GaugeMetricFamily("realtime_channels", "Channels with at least one subscriber "
                                "on this node", value=hub.channel_count)
        yield GaugeMetricFamily("realtime_outbound_buffered_bytes", "Bytes written to clients "
                                "that they have not taken yet", value=buffered_bytes(sessions))
        yield CounterMetricFamily("realtime_publications", "Publications made through this "
                                  "node", value=counters.publications)
        yield CounterMetricFamily("realtime_deliveries", "Publications handed to this node's "
                                  "subscribers (one per recipient)", value=counters.deliveries)
        yield CounterMetricFamily("realtime_broker_reconnects", "Reconnections to Redis after "
                                  "it was lost", value=counters.broker_reconnects)
        disconnects = CounterMetricFamily("realtime_disconnects", "Closed client sessions, by "
                                          "reason", labels=["reason"])
        for reason, count in sorted(counters.disconnects.items()):
            disconnects.add_metric([reason], count)
        yield disconnects
        errors = CounterMetricFamily("realtime_errors", "Errors sent to clients (acks and HTTP "
                                     "answers), by code", labels=["code"])
        for code, count in sorted(counters.errors.items()):
            errors.add_metric([code], count)
        yield errors


class _WebhookCollector(Collector):
    """The webhooks' counters, read at scrape time."""

    def __init__(self, webhooks: Webhooks) -> None:
        self.webhooks = webhooks

    def collect(self) -> Iterator[Metric]:
        webhooks = self.webhooks
        yield CounterMetricFamily("realtime_webhook_events_sent", "Webhook events this node "
                                  "delivered to every URL (one node delivers at a time)",
                                  value=webhooks.sender.delivered_events)
        yield CounterMetricFamily("realtime_webhook_events_dropped", "Webhook events this node "
                                  "saw happen and dropped, the queue being full",
                                  value=webhooks.dropped)
        yield CounterMetricFamily("realtime_webhook_post_failures", "Webhook POSTs that failed "
                                  "(the batch is retried with back-off)",
                                  value=webhooks.sender.failed_posts)
