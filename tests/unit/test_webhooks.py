"""Webhooks, one rule at a time: the signature, the body, batching and retries of the sender,
the offline grace, the node's transitions; the transition store contract on memory."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

import gevent
import pytest

from realtime.config import Config, ConfigError, NamespaceConfig
from realtime.errors import Unavailable
from realtime.webhooks import SIGNATURE_HEADER, encode_body, sign, verify
from realtime.webhooks.memory import MemoryTransitionStore
from realtime.webhooks.sender import DeliveryError, WebhookSender
from realtime.webhooks.service import Webhooks
from tests.contract.webhooks_contract import TransitionContract, drain, names
from tests.helpers import wait_until

SECRET = "s3cret"


class TestMemoryTransitions(TransitionContract):
    @pytest.fixture
    def make_store(self):
        # One process, one store: every "node" is the same store, unless options differ.
        made: dict = {}

        def make(**options):
            key = tuple(sorted(options.items()))
            if key not in made:
                made[key] = MemoryTransitionStore(**options)
            return made[key]

        return make


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- signature and body ------------------------------------------------------------------------

def test_the_signature_is_the_hex_hmac_sha256_of_the_raw_body():
    body = b'{"time_ms":1,"events":[]}'
    assert sign(body, SECRET) == hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert verify(body, sign(body, SECRET), SECRET)
    assert not verify(body + b" ", sign(body, SECRET), SECRET)
    assert not verify(body, sign(body, "other"), SECRET)


def test_the_body_carries_time_ms_and_only_the_public_fields_of_each_event():
    body = encode_body([{"id": "1-1", "name": "user_online", "user": "é", "internal": 3},
                        {"id": "1-2", "name": "channel_vacated", "channel": "room"}], 1234)
    assert json.loads(body) == {"time_ms": 1234, "events": [
        {"id": "1-1", "name": "user_online", "user": "é"},
        {"id": "1-2", "name": "channel_vacated", "channel": "room"}]}


# -- grace -------------------------------------------------------------------------------------

def test_offline_comes_when_the_grace_ends_not_before():
    clock = Clock()
    store = MemoryTransitionStore(grace=5, clock=clock)
    store.connect("c1", "alice")
    store.disconnect("c1")
    clock.now += 4.9
    assert names(store.sweep()) == []
    clock.now += 0.2
    assert names(store.sweep()) == [("user_offline", "alice")]


def test_a_zero_grace_makes_the_user_offline_at_the_next_sweep():
    store = MemoryTransitionStore(grace=0, clock=Clock())
    store.connect("c1", "alice")
    store.disconnect("c1")
    assert names(store.sweep()) == [("user_offline", "alice")]


# -- the sender --------------------------------------------------------------------------------

class Receiver:
    """A fake ``post``: records bodies per URL, fails the URLs in ``down``."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[bytes]] = {}
        self.down: set[str] = set()

    def __call__(self, url, body, headers):
        if url in self.down:
            raise DeliveryError(f"{url} is down")
        assert headers[SIGNATURE_HEADER] == sign(body, SECRET)
        self.bodies.setdefault(url, []).append(body)

    def events(self, url):
        return [event for body in self.bodies.get(url, []) for event in json.loads(body)["events"]]


def sender_for(store, receiver, urls=("http://a/",), batch_size=50):
    return WebhookSender(store, list(urls), SECRET, owner="me", post=receiver,
                         batch_size=batch_size)


def test_the_sender_posts_the_queue_in_batches_and_empties_it():
    store, receiver = MemoryTransitionStore(grace=0), Receiver()
    for n in range(7):
        store.occupy(f"room{n}", "c1")
    sender = sender_for(store, receiver, batch_size=3)
    while sender.deliver_once():
        pass
    assert [len(json.loads(b)["events"]) for b in receiver.bodies["http://a/"]] == [3, 3, 1]
    assert [e["channel"] for e in receiver.events("http://a/")] == [f"room{n}" for n in range(7)]
    assert store.queue_length() == 0


def test_a_failed_url_keeps_the_batch_and_is_retried_alone():
    store, receiver = MemoryTransitionStore(grace=0), Receiver()
    store.connect("c1", "alice")
    sender = sender_for(store, receiver, urls=("http://a/", "http://b/"))
    receiver.down.add("http://b/")
    with pytest.raises(DeliveryError):
        sender.deliver_once()
    assert store.queue_length() == 1
    receiver.down.clear()
    assert sender.deliver_once() is True
    assert len(receiver.bodies["http://a/"]) == 1  # not sent to a again
    assert receiver.events("http://b/") == receiver.events("http://a/")
    assert store.queue_length() == 0


def test_the_sender_loop_survives_failures_and_logs_an_outage_once(caplog):
    store, receiver = MemoryTransitionStore(grace=0), Receiver()
    store.connect("c1", "alice")
    receiver.down.add("http://a/")
    sender = sender_for(store, receiver)
    task = gevent.spawn(sender.run)
    try:
        with caplog.at_level(logging.WARNING, logger="realtime.webhooks.sender"):
            wait_until(lambda: sender._faults.failures >= 3, message="a few failed attempts")
            receiver.down.clear()
            wait_until(lambda: store.queue_length() == 0, timeout=10)
        messages = [r.getMessage() for r in caplog.records]
        assert len([m for m in messages if "retrying until it works" in m]) == 1
        assert len([m for m in messages if "works again" in m]) == 1
    finally:
        sender.stop()
        task.kill()


# -- the service -------------------------------------------------------------------------------

def webhooks_with(store, receiver):
    config = Config(webhook_urls=["http://a/"], webhook_secret=SECRET, node_id="n1")
    return Webhooks(config, store, post=receiver)


def test_a_store_outage_never_reaches_the_caller_and_is_logged_once(caplog):
    class DownStore(MemoryTransitionStore):
        def connect(self, client_id, user):
            raise Unavailable("redis is down")

    webhooks = webhooks_with(DownStore(grace=0), Receiver())
    with caplog.at_level(logging.WARNING, logger="realtime.webhooks.service"):
        for n in range(3):
            webhooks.connected(f"c{n}", "alice")
    assert len(caplog.records) == 1


def test_drops_are_counted_and_logged_once_per_burst(caplog):
    webhooks = webhooks_with(MemoryTransitionStore(grace=0, queue_limit=1), Receiver())
    with caplog.at_level(logging.WARNING, logger="realtime.webhooks.service"):
        for n in range(4):
            webhooks.occupied(f"room{n}", "c1")
        assert webhooks.dropped == 3
        assert len(caplog.records) == 1
        drain(webhooks.store)
        webhooks.occupied("again", "c1")
        assert len(caplog.records) == 2  # the burst's end


# -- config ------------------------------------------------------------------------------------

def test_webhook_settings_come_from_flags_environment_and_files(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    config = Config.load({"webhook_urls": ["http://a/", "http://b/"]},
                         environ={"REALTIME_WEBHOOK_SECRET_FILE": str(secret_file),
                                  "REALTIME_OFFLINE_GRACE": "2.5"})
    assert (config.webhook_urls, config.webhook_secret, config.offline_grace) == (
        ["http://a/", "http://b/"], "from-a-file", 2.5)
    toml = tmp_path / "realtime.toml"
    toml.write_text('[webhooks]\nwebhook_urls = ["http://c/"]\nwebhook_secret = "x"\n')
    assert Config.load(environ={}, config_file=str(toml)).webhook_urls == ["http://c/"]
    assert Config().offline_grace == 5.0


@pytest.mark.parametrize("settings, message", [
    ({"webhook_urls": ["http://a/"]}, "webhook_secret"),
    ({"webhook_urls": ["ftp://a/"], "webhook_secret": "x"}, "http"),
    ({"offline_grace": -1}, "offline_grace"),
])
def test_bad_webhook_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        Config(**settings)


# -- the node's transitions --------------------------------------------------------------------

@pytest.fixture
def node_and_store():
    from realtime.broker import MemoryBroker
    from realtime.node import Node
    from realtime.presence import MemoryPresenceStore

    store = MemoryTransitionStore(grace=0)
    config = Config(node_id="n1", webhook_urls=["http://a/"], webhook_secret=SECRET,
                    namespaces={"quiet": NamespaceConfig(presence=False)})
    node = Node(config, MemoryBroker(), MemoryPresenceStore(),
                Webhooks(config, store, post=Receiver()))
    yield node, store
    node.stop()


def node_events(store):
    return [(e["name"], e.get("channel"), e.get("user")) for e in drain(store)]


def test_the_node_reports_connections_subscriptions_and_presence_as_events(node_and_store):
    from tests.unit.fakes import FakeSubscriber

    node, store = node_and_store
    first, second = FakeSubscriber("a1", "alice", node), FakeSubscriber("a2", "alice", node)
    for session in (first, second):
        node.connect(session)
        node.subscribe(session, "chat:room")  # chat: keeps presence
        node.subscribe(session, "quiet:room")  # no presence: no member events
    bob = FakeSubscriber("b1", "bob", node)
    node.connect(bob)
    node.subscribe(bob, "chat:room")
    node.subscribe(bob, "quiet:room")
    assert node_events(store) == [
        ("user_online", None, "alice"), ("member_added", "chat:room", "alice"),
        ("channel_occupied", "chat:room", None), ("channel_occupied", "quiet:room", None),
        ("user_online", None, "bob"), ("member_added", "chat:room", "bob")]
    node.unsubscribe(bob, "chat:room")
    node.disconnect(first)
    assert node_events(store) == [("member_removed", "chat:room", "bob")]
    node.disconnect(second)
    node.disconnect(bob)
    assert sorted(node_events(store)) == [
        ("channel_vacated", "chat:room", None), ("channel_vacated", "quiet:room", None),
        ("member_removed", "chat:room", "alice")]
    store.sweep()
    assert sorted(node_events(store)) == [("user_offline", None, "alice"),
                                          ("user_offline", None, "bob")]


def test_the_cluster_command_passes_webhook_settings_to_every_node_secret_in_the_environment():
    from realtime.cli import build_parser
    from realtime_dev.command import node_shared_settings

    args = build_parser().parse_args(
        ["cluster", "--webhook-url", "http://a/hook", "--webhook-url", "http://b/hook",
         "--webhook-secret", "s3cret", "--offline-grace", "2"])
    flags, env = node_shared_settings(args)
    assert flags == ["--webhook-url", "http://a/hook", "--webhook-url", "http://b/hook",
                     "--offline-grace", "2.0"]
    assert env == {"REALTIME_WEBHOOK_SECRET": "s3cret"}


def test_presence_refresh_leaves_out_a_subscription_still_being_set_up():
    # The refresh re-adds missing entries: adding one before the subscribe's own add made that
    # add "not first", and the member_added (and the join) of the user was lost.
    from realtime.broker import StreamPosition
    from realtime.hub import Hub
    from tests.unit.fakes import FakeSubscriber

    hub = Hub()
    session = FakeSubscriber("c1", "alice")
    hub.add_session(session)
    hub.add_subscriber(session, "room")
    assert hub.presence_entries() == []
    hub.activate(session, "room", StreamPosition("", 0))
    assert hub.presence_entries() == [("room", "c1", "alice")]


def test_the_nodes_metrics_show_webhook_events_sent_dropped_and_failed_posts():
    from prometheus_client.parser import text_string_to_metric_families

    from realtime.broker import MemoryBroker
    from realtime.node import Node
    from realtime.presence import MemoryPresenceStore

    receiver = Receiver()
    store = MemoryTransitionStore(grace=0, queue_limit=2)
    config = Config(node_id="n1", webhook_urls=["http://a/"], webhook_secret=SECRET)
    webhooks = Webhooks(config, store, post=receiver)
    node = Node(config, MemoryBroker(), MemoryPresenceStore(), webhooks)

    def samples():
        return {sample.name: sample.value
                for family in text_string_to_metric_families(node.metrics.exposition().decode())
                for sample in family.samples if sample.name.startswith("realtime_webhook_")}

    assert samples() == {"realtime_webhook_events_sent_total": 0,
                         "realtime_webhook_events_dropped_total": 0,
                         "realtime_webhook_post_failures_total": 0}
    for n in range(3):
        webhooks.occupied(f"room{n}", "c1")  # the third does not fit
    receiver.down.add("http://a/")
    with pytest.raises(DeliveryError):
        webhooks.sender.deliver_once()
    receiver.down.clear()
    assert webhooks.sender.deliver_once() is True
    assert samples() == {"realtime_webhook_events_sent_total": 2,
                         "realtime_webhook_events_dropped_total": 1,
                         "realtime_webhook_post_failures_total": 1}
