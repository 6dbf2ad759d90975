"""The node: the core API that the Socket.IO edge, the HTTP API and the CLI call.

A node ties together the broker (fan-out and history between nodes), the presence store and the
node-local hub. It knows nothing of Socket.IO or HTTP: the edges parse and authorise, call a
method here, and translate :class:`~realtime.errors.RealtimeError` into their own error shape.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import secrets
import time
from collections.abc import Sequence
from typing import Any

import gevent
import gevent.event

from .broker.base import (
    Broker,
    HistoryOptions,
    HistoryResult,
    Publication,
    PublishRequest,
    StreamPosition,
    publish_by_history,
)
from .channels import ChannelPolicy
from .config import Config, NamespaceConfig
from .continuity import Continuity
from .control import ControlMessageError, decode_control, encode_control
from .errors import Forbidden, RealtimeError
from .faults import FaultLog
from .hub import Hub, Subscribed, Subscriber
from .metrics import Metrics, merge_stats
from .payloads import check_publication_data
from .presence.base import PresenceMember, PresenceStore
from .webhooks.service import Webhooks

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 2.0
NODE_EXPIRY = 3 * HEARTBEAT_INTERVAL
SURVEY_TIMEOUT = 2.0


@dataclasses.dataclass(frozen=True, slots=True)
class SubscribeResult:
    channel: str
    position: StreamPosition
    recovered: bool
    publications: list[Publication]

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "epoch": self.position.epoch,
            "offset": self.position.offset,
            "recovered": self.recovered,
            "publications": [p.to_event() for p in self.publications],
        }


@dataclasses.dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    connections: int
    subscriptions: int
    uptime_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Survey:
    """Answers to a control request from every live node, collected until all are in."""

    def __init__(self, expected: set[str]) -> None:
        self.expected = expected
        self.answers: dict[str, int] = {}
        self.done = gevent.event.Event()

    def answer(self, node_id: str, value: int) -> None:
        self.answers[node_id] = value
        if self.expected <= self.answers.keys():
            self.done.set()


class Node:
    """One realtime node. Create, :meth:`start`, serve, :meth:`stop`."""

    def __init__(self, config: Config, broker: Broker, presence: PresenceStore,
                 webhooks: Webhooks | None = None) -> None:
        self.config = config
        # None without webhook URLs: then the node records no transitions at all.
        self.webhooks = webhooks
        self.node_id = config.node_id
        self.broker = broker
        self.presence_store = presence
        presence.on_expired = self._on_presence_expired
        self.hub = Hub()
        # What the node counts (metrics.Counters, bumped by the core) and shows (/metrics).
        self.metrics = Metrics(self.hub)
        self.counters = self.metrics.counters
        if webhooks is not None:
            self.metrics.watch_webhooks(webhooks)
        self.continuity = Continuity(self.hub, self._history_since)
        self.channels = ChannelPolicy(config)
        # The node's defaults; a channel's namespace may change them (history_options_for).
        self.history_options = HistoryOptions(size=config.history_size, ttl=config.history_ttl)
        self._history_options: dict[tuple[int, float], HistoryOptions] = {}
        self._started_at = time.monotonic()
        # node id -> (monotonic time heard from, its info, its stats snapshot or None)
        self._peers: dict[str, tuple[float, NodeInfo, dict[str, Any] | None]] = {}
        self._surveys: dict[str, _Survey] = {}
        self._tasks: list[gevent.Greenlet] = []
        self._running = False
        self._heartbeat_faults = FaultLog(logger, "the node's heartbeat")
        # Set when the node is shutting down: it is no longer ready for new traffic.
        self.draining = False

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the broker and the background work (heartbeats, presence refresh)."""
        self.broker.instrument(self.metrics)
        self.broker.start(self)
        self._running = True
        self._tasks.append(gevent.spawn(self._heartbeat_loop))
        if self.webhooks is not None:
            self.webhooks.start()

    def stop(self) -> None:
        self._running = False
        gevent.killall(self._tasks)
        self._tasks.clear()
        if self.webhooks is not None:
            self.webhooks.stop()
        self.continuity.close()
        self.broker.close()
        self.presence_store.close()

    def is_ready(self) -> bool:
        """True when the node can take traffic: started, not draining, its broker healthy."""
        return self._running and not self.draining and self.broker.is_healthy()

    # -- sessions ----------------------------------------------------------------------------

    def connect(self, session: Subscriber) -> None:
        self.hub.add_session(session)
        if self.webhooks is not None:
            self.webhooks.connected(session.client_id, session.user)

    def disconnect(self, session: Subscriber) -> None:
        """Forget a session that went away: its subscriptions and presence go with it."""
        for channel in self.hub.remove_session(session):
            try:
                self._leave(session, channel)
            except RealtimeError as exc:
                logger.warning("cleanup of %s in %s failed: %s", session, channel, exc,
                               extra={"user": session.user, "channel": channel,
                                      "code": exc.code})
        if self.webhooks is not None and session.client_id:  # "": it never connected
            self.webhooks.disconnected(session.client_id)

    # -- subscriptions -----------------------------------------------------------------------

    def subscribe(self, session: Subscriber, channel: str,
                  since: StreamPosition | None = None) -> SubscribeResult:
        """Subscribe ``session`` to ``channel``, recovering from ``since`` when given.

        Publications made while the subscription is set up reach the session after the
        reply to this call, never before and never twice (see :meth:`Hub.activate`).
        """
        rules = self.channels.rules(channel)
        if not rules.recovery:
            since = None  # the namespace keeps no recovery: a subscribe starts from now
        added = self.hub.add_subscriber(session, channel)
        if added is Subscribed.ALREADY:
            return self._position_for(channel, since)
        try:
            # Every subscriber waits for the node's broker subscription, not only the first:
            # a second one must not read the stream position before it is confirmed.
            self.broker.subscribe(channel)
            result = self._position_for(channel, since)
            identity = session.identity
            first = rules.presence and self.presence_store.add(
                channel, session.client_id, session.user,
                identity.info if identity is not None else None)
            if first and self.webhooks is not None:
                self.webhooks.member_added(channel, session.user)
            if first and rules.join_leave:
                self.broker.publish_join(channel, session.user)
        except Exception:
            self._unsubscribe_locally(session, channel)
            raise
        if channel not in session.channels:
            # The session went away (or unsubscribed) while this greenlet waited on the
            # broker; its cleanup ran before the presence entry above existed.
            self._leave_presence(session, channel)
            return result
        if self.webhooks is not None:
            self.webhooks.occupied(channel, session.client_id)
        position = result.position
        session.after_reply(lambda: self.continuity.subscribed(session, channel, position))
        return result

    def unsubscribe(self, session: Subscriber, channel: str) -> None:
        """Unsubscribe ``session`` from ``channel``; a no-op when it was not subscribed."""
        if channel in session.channels:
            self._leave(session, channel)

    def _leave(self, session: Subscriber, channel: str) -> None:
        self._unsubscribe_locally(session, channel)
        if self.webhooks is not None:
            self.webhooks.vacated(channel, session.client_id)
        self._leave_presence(session, channel)

    def _leave_presence(self, session: Subscriber, channel: str) -> None:
        rules = self.channels.rules(channel)
        if rules.presence and self.presence_store.remove(channel, session.client_id,
                                                         session.user):
            if self.webhooks is not None:
                self.webhooks.member_removed(channel, session.user)
            if rules.join_leave:
                self.broker.publish_leave(channel, session.user)

    def _unsubscribe_locally(self, session: Subscriber, channel: str) -> None:
        _, last_on_node = self.hub.remove_subscriber(session, channel)
        if last_on_node:
            self.continuity.forget(channel)
            self.broker.unsubscribe(channel)

    def _position_for(self, channel: str, since: StreamPosition | None) -> SubscribeResult:
        """The stream position of ``channel`` and, given ``since``, what the client missed.

        The position is ``("", 0)`` while the channel has no stream (nothing published yet):
        reading it stores nothing. A client that saw that position and comes back with
        ``since`` at epoch ``""`` is recovered by the rules of :func:`_is_complete_recovery`.
        """
        if since is None:
            result = self.broker.history(channel, limit=0, options=self.history_options)
            return SubscribeResult(channel, result.position, False, [])
        result = self.broker.history(channel, since_offset=since.offset,
                                     options=self.history_options)
        if _is_complete_recovery(since, result):
            return SubscribeResult(channel, result.position, True, result.publications)
        return SubscribeResult(channel, result.position, False, [])

    # -- publishing and reading --------------------------------------------------------------

    def publish(self, channel: str, data: Any, user: str | None = None, *,
                idempotency_key: str | None = None) -> StreamPosition:
        """Publish ``data`` (any JSON value) on ``channel`` as ``user`` (None: a backend).

        One request of :meth:`publish_many`; raises the error that refused it.
        """
        result = self.publish_many([PublishRequest(channel, data, user, idempotency_key)])[0]
        if isinstance(result, RealtimeError):
            raise result
        return result

    def publish_many(self, requests: Sequence[PublishRequest],
                     ) -> list[StreamPosition | RealtimeError]:
        """Make ``requests`` in order with one round trip to the broker: the node's one way
        of publishing, whoever asks (clients, the HTTP API).

        Each request gets its position or the error that refused it (see
        ``Broker.publish_many``). The channel's namespace sets the data limit and the history
        kept; who may publish is the edges' business (clients are checked by the protocol,
        backends are trusted). A repeated ``idempotency_key`` gets the first position back.
        """
        results = publish_by_history(
            requests, self._checked_history,
            lambda accepted, history: self.broker.publish_many(accepted, history=history))
        self.counters.publications += sum(
            not isinstance(result, RealtimeError) for result in results)
        return results

    def check_data_size(self, channel: str, data: Any) -> None:
        """Raise unless ``data`` is a JSON value within ``channel``'s namespace's limit."""
        limit = self.channels.rules(channel).max_message_size or self.config.max_message_size
        check_publication_data(data, limit)

    def _checked_history(self, request: PublishRequest) -> HistoryOptions:
        """Raise unless ``request``'s data is within its namespace's limit; its channel's
        history options (one look at the namespace's rules for both)."""
        rules = self.channels.rules(request.channel)
        check_publication_data(request.data,
                               rules.max_message_size or self.config.max_message_size)
        return self._history_options_of(rules)

    def history_options_for(self, channel: str) -> HistoryOptions:
        """How much of ``channel``'s stream is kept: its namespace's setting, or the node's."""
        return self._history_options_of(self.channels.rules(channel))

    def _history_options_of(self, rules: NamespaceConfig) -> HistoryOptions:
        if rules.history_size is None and rules.history_ttl is None:
            return self.history_options
        key = (rules.history_size or self.config.history_size,
               rules.history_ttl or self.config.history_ttl)
        options = self._history_options.get(key)
        if options is None:
            options = self._history_options[key] = HistoryOptions(size=key[0], ttl=key[1])
        return options

    def _history_since(self, channel: str, since_offset: int) -> HistoryResult:
        return self.broker.history(channel, since_offset=since_offset,
                                   options=self.history_options_for(channel))

    def history(self, channel: str, limit: int | None = None) -> HistoryResult:
        """The last ``limit`` publications of ``channel`` (all kept when None), oldest first."""
        return self.broker.history(channel, limit=limit,
                                   options=self.history_options_for(channel))

    def presence(self, channel: str) -> list[PresenceMember]:
        """The users present in ``channel``; Forbidden where its namespace keeps no presence."""
        if not self.channels.rules(channel).presence:
            raise Forbidden("presence is off for this channel's namespace")
        return self.presence_store.members(channel)

    # -- cluster-wide commands ---------------------------------------------------------------

    def disconnect_user(self, user: str) -> int:
        """Disconnect every session of ``user`` on every node; return how many there were.

        Nodes that do not answer within the survey timeout are not counted.
        """
        request_id = secrets.token_hex(8)
        survey = self._surveys[request_id] = _Survey(set(self._live_peers()) | {self.node_id})
        try:
            self._send_control("disconnect", user=user, req=request_id)
            survey.done.wait(SURVEY_TIMEOUT)
        finally:
            del self._surveys[request_id]
        missing = survey.expected - survey.answers.keys()
        if missing:
            logger.warning("disconnect of %r: no answer from nodes %s", user, sorted(missing))
        return sum(survey.answers.values())

    def info(self) -> list[NodeInfo]:
        """This node and every node heard from recently, sorted by node id."""
        infos = {self.node_id: self.local_info()}
        now = time.monotonic()
        for node_id, (seen_at, info, _) in self._peers.items():
            if now - seen_at < NODE_EXPIRY and node_id != self.node_id:
                infos[node_id] = info
        return [infos[node_id] for node_id in sorted(infos)]

    def stats(self) -> dict[str, Any]:
        """The ``/api/stats`` answer: this node's figures taken now, every node heard from
        recently with the figures of its last heartbeat (one every :data:`HEARTBEAT_INTERVAL`
        at most), and the busiest channels summed over them (see
        :func:`realtime.metrics.merge_stats`)."""
        snapshots = {self.node_id: self.metrics.snapshot()}
        now = time.monotonic()
        for node_id, (seen_at, _, snapshot) in self._peers.items():
            if now - seen_at < NODE_EXPIRY and node_id != self.node_id and snapshot is not None:
                snapshots[node_id] = snapshot
        return merge_stats(snapshots)

    def local_info(self) -> NodeInfo:
        return NodeInfo(self.node_id, self.hub.session_count, self.hub.subscription_count,
                        round(time.monotonic() - self._started_at, 3))

    def _live_peers(self) -> list[str]:
        now = time.monotonic()
        return [node_id for node_id, (seen_at, _, _) in self._peers.items()
                if now - seen_at < NODE_EXPIRY]

    def _disconnect_local(self, user: str) -> int:
        sessions = self.hub.sessions_of(user)
        for session in sessions:
            # A deliberate disconnect: the client is told, and does not reconnect by itself.
            session.close("disconnected by the server", notify=True)
        return len(sessions)

    def _send_control(self, kind: str, **fields: Any) -> None:
        self.broker.publish_control(encode_control(self.node_id, kind, **fields))

    def _heartbeat_loop(self) -> None:
        """Announce this node and refresh its presence entries, forever, surviving failures."""
        # Every entry is refreshed once per third of the TTL (it survives two missed refreshes),
        # a slice of the sessions per heartbeat: thousands of entries refreshed at once
        # would stall the event loop, and every client's latency with it.
        slices = max(1, int(self.config.presence_ttl / 3 / HEARTBEAT_INTERVAL))
        beat = 0
        while self._running:
            if self.webhooks is not None:  # never raises: it logs its own failures
                self.webhooks.heartbeat(*self.hub.webhook_entries(beat % slices, slices))
            try:
                # One message per beat carries both the info and the stats of this node.
                self._send_control("node", info=dataclasses.astuple(self.local_info()),
                                   stats=self.metrics.snapshot())
                rules = self.channels.rules
                self.presence_store.refresh([
                    entry for entry in self.hub.presence_entries(beat % slices, slices)
                    if rules(entry[0]).presence])
                self.presence_store.sweep()
            except RealtimeError as exc:
                # Redis away: the broker logs the outage, once; the next beat tries again.
                logger.debug("heartbeat failed: %s", exc)
            except Exception as exc:
                self._heartbeat_faults.failed(exc, unexpected=True)
            else:
                self._heartbeat_faults.recovered()
            beat += 1
            gevent.sleep(HEARTBEAT_INTERVAL * random.uniform(0.8, 1.0))

    def _on_presence_expired(self, channel: str, users: list[str]) -> None:
        """The presence of ``users`` in ``channel`` expired (their node died): publish their
        leave, once for the whole deployment (the store reports each expiry once)."""
        if self.webhooks is not None:
            self.webhooks.members_expired(channel, users)
        if not self.channels.rules(channel).join_leave:
            return
        for user in users:
            try:
                self.broker.publish_leave(channel, user)
            except RealtimeError as exc:
                logger.debug("the leave of %r in %r after its expiry was lost: %s", user,
                             channel, exc)

    # -- BrokerEventHandler ------------------------------------------------------------------

    def on_publications(self, publications: list[Publication]) -> None:
        # One observation per batch the broker hands over (never per recipient).
        started = time.perf_counter()
        self.continuity.deliver(publications)
        self.metrics.observe_fanout(time.perf_counter() - started)

    def on_delivery_resumed(self) -> None:
        self.continuity.resume()

    def on_join(self, channel: str, user: str) -> None:
        self.hub.deliver_presence_event("join", channel, user)

    def on_leave(self, channel: str, user: str) -> None:
        self.hub.deliver_presence_event("leave", channel, user)

    def on_control(self, payload: bytes) -> None:
        try:
            message = decode_control(payload)
            kind, sender = message["t"], message["node"]
            if kind == "node":
                stats = message.get("stats")  # nodes of older versions send none
                self._peers[sender] = (time.monotonic(), NodeInfo(*message["info"]),
                                       stats if isinstance(stats, dict) else None)
            elif kind == "disconnect":
                count = self._disconnect_local(message["user"])
                if message.get("req") is not None:  # emitters do not wait for answers
                    self._send_control("disconnected", req=message["req"], count=count)
            elif kind == "disconnected":
                survey = self._surveys.get(message["req"])
                if survey is not None:
                    survey.answer(sender, message["count"])
            else:
                raise ControlMessageError(f"unknown control message type {kind!r}")
        except (ControlMessageError, KeyError, TypeError) as exc:
            logger.warning("dropped a control message that does not decode: %s", exc)
        except RealtimeError as exc:
            logger.warning("could not answer a control message: %s", exc)


def _is_complete_recovery(since: StreamPosition, result: HistoryResult) -> bool:
    """True when ``result`` holds every publication after ``since``, none missing.

    ``since`` must be of the stream's current epoch, with an offset no newer than the stream's.
    Epoch ``""`` (the client saw the channel before anything was published) matches whatever
    the current epoch is: the stream was created after the client looked, so it is recovered
    when the history still holds every publication from ``since.offset + 1`` on (all of them,
    for a client that received none live). Still no stream, at offset 0: nothing was missed.

    The limit of that choice: a client keeps epoch ``""`` while it receives publications live,
    so a stream that was created, forgotten (``meta_ttl`` without a publication, a day by
    default) and created again while the client was away cannot be told apart from one created
    once. The client then counts as recovered from its offset in the new stream, though the
    offsets it holds belonged to the forgotten stream and it never gets the new stream's
    publications up to that offset.
    """
    position = result.position
    same_stream = since.epoch in ("", position.epoch)
    if not same_stream or not 0 <= since.offset <= position.offset:
        return False
    missed = position.offset - since.offset
    publications = result.publications
    return len(publications) == missed and (
        missed == 0 or publications[0].offset == since.offset + 1)
