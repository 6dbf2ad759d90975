"""Nothing acknowledged is lost silently: numbered streams through nginx under faults (issue 10).

Each scenario runs a real cluster (redis-server, three nodes, nginx), publishers of numbered
messages and subscribers of every kind (see tests/integration/streams.py), injects one fault,
and checks every subscriber's stream of every channel: no gap that was not announced by a
`reset` or a `recovered: false`, no duplicate, no reordering and, whenever Redis kept its data,
every acknowledged publication delivered to every subscriber.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import requests

from realtime.emitter import Emitter
from realtime_dev.cluster import LocalCluster
from tests.helpers import wait_until
from tests.integration.clients import connect_client
from tests.integration.streams import (
    Clock,
    JsSubscriber,
    Ledger,
    Subscriber,
    Traffic,
    check_streams,
    data_key,
    node_of,
    timeline,
    unique_channels,
)
from tests.integration.test_nginx_under_load import LOAD_SECONDS, LOOPS, HandshakeLoops
from tests.integration.test_nginx_under_load import failures as handshake_failures

NODES = ("n1", "n2", "n3")
# History that holds every publication of a run for as long as it lasts: recovery never falls
# back on `recovered: false` for want of history, so any announced gap is a real loss.
LONG_HISTORY = ["--history-size", "5000", "--history-ttl", "600"]


@contextlib.contextmanager
def running_cluster(workdir: Path, *node_args: str, redis_appendonly: bool = False,
                    ) -> Iterator[LocalCluster]:
    cluster = LocalCluster(workdir=workdir, nodes=len(NODES), redis_appendonly=redis_appendonly,
                           node_args=[*LONG_HISTORY, *node_args])
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def moved_and_recovered(subscriber: Subscriber, away_from: str, channels: list[str],
                        after: float) -> bool:
    """True once ``subscriber`` is connected to a node other than ``away_from`` and every
    channel was resubscribed since ``after`` with `since` and answered `recovered: true`."""
    state = subscriber.state()
    if not state.connected or state.node == away_from or state.subscribed != set(channels):
        return False
    recovered = {rec["channel"] for rec in subscriber.records()
                 if rec["kind"] == "subscribed" and rec["t"] > after and rec.get("since")
                 and isinstance(rec["ack"], dict) and rec["ack"].get("recovered")}
    return recovered >= set(channels)


def wait_moved(subscribers: list[Subscriber], away_from: str, channels: list[str],
               after: float, timeout: float = 20.0) -> None:
    pending = list(subscribers)

    def all_moved() -> bool:
        pending[:] = [s for s in pending if not moved_and_recovered(s, away_from, channels,
                                                                     after)]
        return not pending

    try:
        wait_until(all_moved, timeout, interval=0.05,
                   message=f"the clients of {away_from} to reconnect elsewhere and recover")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still waiting for:\n"
                             + "\n".join(timeline(s) for s in pending)) from None


# -- (1) a node SIGKILLed ---------------------------------------------------------------------


def test_a_node_killed_under_traffic_loses_nothing_and_its_clients_recover_elsewhere(tmp_path):
    channels = unique_channels(3)
    with running_cluster(tmp_path) as cluster, \
            Traffic(cluster.url, channels, tmp_path) as traffic:
        traffic.standard_mix()
        traffic.start()
        traffic.wait_published(10)
        victim = traffic.busiest_node(NODES)
        on_victim = traffic.subscribers_on(victim)
        assert on_victim, "nginx put no subscriber on any node?"
        killed_at = traffic.phase(f"SIGKILL {victim}, which holds {on_victim}")
        cluster.kill_node(victim)
        wait_moved(on_victim, victim, channels, killed_at)
        traffic.wait_published(10, after=traffic.phase("its clients moved and recovered"))
        traffic.stop_publishers()
        traffic.settle()
        traffic.check(data_kept=True)


# -- (2) Redis SIGKILLed and restarted on the same port ---------------------------------------

# How long Redis stays down.
REDIS_OUTAGE = 3.0


def redis_killed_and_restarted(tmp_path: Path, *, appendonly: bool) -> None:
    channels = unique_channels(3)
    with running_cluster(tmp_path, redis_appendonly=appendonly) as cluster, \
            Traffic(cluster.url, channels, tmp_path) as traffic:
        traffic.standard_mix()
        traffic.start()
        traffic.wait_published(10)
        before = traffic.stream_positions()
        (redis,) = [child for child in cluster.children if child.kind == "redis"]
        killed_at = traffic.phase("SIGKILL redis")
        redis.kill()
        # Down for REDIS_OUTAGE seconds, and long enough for every publisher to have felt it
        # (publishes refused or lost).
        wait_until(lambda: traffic.clock() - killed_at >= REDIS_OUTAGE
                   and all(traffic.ledger.failures(p.name, killed_at)
                           for p in traffic.publishers),
                   timeout=REDIS_OUTAGE + 10, interval=0.05,
                   message="the outage to last 3 s and reach every publisher")
        # The same command line: the same port, and the same append-only file when there is one.
        redis = cluster.restart(redis)
        wait_until(lambda: cluster.is_ready(redis), timeout=10, interval=0.05,
                   message="redis to answer again")
        restarted_at = traffic.phase("redis answers again")
        traffic.wait_published(10, after=restarted_at, timeout=20)
        traffic.stop_publishers()
        traffic.settle()
        after = traffic.stream_positions()
        for channel in channels:
            # The run tested what it says: history survived with AOF, not without.
            same_epoch = after[channel][0] == before[channel][0]
            assert same_epoch == appendonly, (channel, before[channel], after[channel])
        traffic.check(data_kept=appendonly)


def test_a_redis_restart_without_persistence_never_drops_messages_silently(tmp_path):
    """History is lost: subscribers must be told (`reset`, or `recovered: false` when they
    resubscribe), never left with a silent gap."""
    redis_killed_and_restarted(tmp_path, appendonly=False)


def test_a_redis_restart_with_aof_loses_no_acknowledged_publication(tmp_path):
    """With AOF (appendfsync everysec) history survives a SIGKILL of Redis: the nodes fill the
    gap of the outage from it and every subscriber gets every acknowledged publication."""
    redis_killed_and_restarted(tmp_path, appendonly=True)


# -- (3) a node drained with SIGTERM ----------------------------------------------------------

DRAIN_TIMEOUT = 3.0


def readyz(url: str) -> int:
    """The status /readyz answers, 0 when nothing answers."""
    try:
        return requests.get(url + "/readyz", timeout=1).status_code
    except requests.RequestException:
        return 0


def presence(url: str, channel: str) -> dict[str, int]:
    response = requests.get(f"{url}/api/presence/{channel}", timeout=5)
    assert response.status_code == 200, response.text
    return {m["user"]: m["connections"] for m in response.json()["members"]}


def test_a_node_drained_with_sigterm_moves_its_clients_loses_nothing_and_says_leave(tmp_path):
    run = uuid.uuid4().hex[:8]
    # a chat channel: join/leave on
    channels = [f"chat:rel-{run}-0", f"rel-{run}-1", f"rel-{run}-2"]
    chat = channels[0]
    with running_cluster(tmp_path, "--drain-timeout", str(DRAIN_TIMEOUT)) as cluster, \
            Traffic(cluster.url, channels, tmp_path) as traffic, \
            contextlib.ExitStack() as cleanup:
        traffic.standard_mix()
        traffic.start()
        traffic.wait_published(10)
        victim = traffic.busiest_node(NODES)
        on_victim = traffic.subscribers_on(victim)
        assert on_victim, "nginx put no subscriber on any node?"
        # A client straight on the victim that will not come back, and a watcher elsewhere.
        leaver_name = f"leaver-{run}"
        leaver = connect_client(cluster.node_urls[victim], "websocket", leaver_name)
        cleanup.callback(leaver.disconnect)
        watcher = connect_client(cluster.node_urls[next(n for n in NODES if n != victim)],
                                 "websocket", f"watcher-{run}")
        cleanup.callback(watcher.disconnect)
        assert watcher.call("subscribe", {"channel": chat}, timeout=10)["ok"]
        assert leaver.call("subscribe", {"channel": chat}, timeout=10)["ok"]
        wait_until(lambda: {"channel": chat, "user": leaver_name} in watcher.events("join"),
                   timeout=5, message="the leaver's join")

        child = cluster.node(victim)
        sigterm_at = traffic.phase(f"SIGTERM {victim}, which holds {on_victim}")
        child.send_signal(signal.SIGTERM)
        # /readyz stops answering 200 at once (503; or nothing, once the listener is closed),
        # so that a load balancer that checks it sends nothing new there.
        wait_until(lambda: readyz(cluster.node_urls[victim]) != 200, timeout=1.0,
                   interval=0.02, message=f"{victim}'s /readyz to stop answering 200 after "
                                          f"SIGTERM")
        wait_moved(on_victim, victim, channels, sigterm_at, timeout=DRAIN_TIMEOUT + 10)
        assert readyz(cluster.node_urls[victim]) != 200
        wait_until(lambda: not child.alive(), timeout=DRAIN_TIMEOUT + 5, interval=0.05,
                   message=f"{victim} to exit after its drain")
        assert child.returncode == 0, f"{victim} exited {child.returncode}:\n{child.log_tail()}"
        # Its sessions' presence is removed with leave events, not left to expire (30 s).
        wait_until(lambda: {"channel": chat, "user": leaver_name} in watcher.events("leave"),
                   timeout=5, message=f"the leave of {leaver_name}, a client of the drained "
                                      f"node")
        assert not leaver.connected
        traffic.wait_published(10, after=traffic.phase(f"{victim} exited, leave seen"))
        traffic.stop_publishers()
        traffic.settle()
        traffic.check(data_kept=True)
        # In-flight HTTP requests finished: no publish through nginx failed during the drain.
        failed = [f for f in traffic.ledger.failures(after=sigterm_at)
                  if f.publisher.startswith("http")]
        assert not failed, failed
        # Every subscriber is in the chat's presence once: its drained session is gone.
        expected = {s.name: 1 for s in traffic.subscribers} | {f"watcher-{run}": 1}
        wait_until(lambda: presence(cluster.url, chat) == expected, timeout=5, interval=0.1,
                   message=f"presence of {chat} to be {expected} "
                           f"(it is {presence(cluster.url, chat)})")


# -- (4) a client that stops reading ----------------------------------------------------------

# Big publications while the slow clients do not read: the kernel's socket buffers (a few MB
# on loopback) and the node's outbound limit (1 MiB by default) fill in a second or two
# instead of a minute.
BIG_PAD = 48 * 1024


def test_a_client_that_stops_reading_is_dropped_as_slow_then_reconnects_and_recovers(tmp_path):
    channels = unique_channels(2)
    with running_cluster(tmp_path) as cluster, \
            Traffic(cluster.url, channels, tmp_path) as traffic:
        publishers = [traffic.http_publisher(f"http-{i}", interval=0.0) for i in (1, 2)]
        traffic.socketio_publisher("sio-1")
        slow = [traffic.js_subscriber("js-slow-websocket", "websocket"),
                traffic.js_subscriber("js-slow-msgpack-websocket", "msgpack-websocket")]
        # Subscribers that keep reading. (No long-polling one: on long-polling, what waits for
        # the next GET counts against the outbound limit, and a few big publications between
        # two polls are more than a long-polling client may fall behind by design.)
        traffic.js_subscriber("js-default", "default")
        traffic.js_subscriber("js-msgpack-default", "msgpack-default")
        traffic.py_subscriber("py-msgpack-websocket", "msgpack-websocket")
        traffic.start()
        traffic.wait_published(5)
        sids = {s.name: s.state().sid for s in slow}
        paused_at = traffic.phase(f"pause {slow}")
        for subscriber in slow:
            subscriber.command("pause")
        wait_until(lambda: all(any(r["kind"] == "paused" and r["ok"] for r in s.records())
                               for s in slow), timeout=5, message="the clients to stop reading")
        for publisher in publishers:
            publisher.pad = "x" * BIG_PAD

        def dropped_as_slow(subscriber: JsSubscriber) -> bool:
            sid = sids[subscriber.name]
            log = cluster.node(node_of(sid)).log_path.read_text(errors="replace")
            return any(sid in line and line.rstrip().endswith(": slow")
                       for line in log.splitlines())

        wait_until(lambda: all(dropped_as_slow(s) for s in slow), timeout=20, interval=0.1,
                   message=f"the node to drop the clients that stopped reading as slow "
                           f"(sessions {sids}: no 'closed <Session ...>: slow' in the node's "
                           f"log)")
        for publisher in publishers:
            publisher.pad = ""
        # Nobody else fell behind: only the two that stopped reading were dropped.
        for subscriber in traffic.subscribers:
            if subscriber not in slow:
                assert not [r for r in subscriber.records() if r["kind"] == "disconnect"], \
                    timeline(subscriber)
        traffic.phase("dropped as slow; resume")
        for subscriber in slow:
            subscriber.command("resume")
        wait_moved(slow, "", channels, paused_at)
        traffic.wait_published(5, after=traffic.phase("reconnected and recovered"))
        traffic.stop_publishers()
        traffic.settle()
        traffic.check(data_kept=True)


# -- (5) polling handshakes through nginx under load ------------------------------------------


def test_ten_polling_handshake_loops_for_15_s_get_no_502_while_streams_stay_whole(tmp_path):
    """Issue 10's test (5), with numbered streams flowing meanwhile. The handshake loops are
    test_nginx_under_load.py's (the official client's start: handshake, CONNECT, poll,
    close, from 10 loopback addresses)."""
    channels = unique_channels(3)
    with running_cluster(tmp_path) as cluster, \
            Traffic(cluster.url, channels, tmp_path) as traffic:
        traffic.standard_mix()
        traffic.start()
        sessions = HandshakeLoops(cluster.url, LOOPS).run_for(LOAD_SECONDS)
        traffic.stop_publishers()
        statuses = collections.Counter(step.status for s in sessions for step in s.steps)
        assert statuses[502] == 0, (statuses, handshake_failures(sessions)[:20])
        assert not handshake_failures(sessions), (statuses, handshake_failures(sessions)[:20])
        assert len(sessions) >= 5 * LOOPS, statuses
        assert not traffic.ledger.failures(), traffic.ledger.failure_summary(limit=20)
        traffic.settle()
        traffic.check(data_kept=True)


# -- (6) idempotent retries of publishes whose answers were lost ------------------------------


def history_of(url: str, channel: str) -> dict:
    response = requests.get(f"{url}/api/history/{channel}", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def test_publishes_retried_after_their_answers_were_lost_are_published_once(tmp_path):
    """Every third publication's answer is lost (HTTP: the connection closed with the answer
    unread; Socket.IO: emitted without an ack) and retried through nginx with the same
    idempotency_key: one publication each, and the retry answered with its epoch/offset."""
    channels = unique_channels(3)
    with running_cluster(tmp_path) as cluster, \
            Traffic(cluster.url, channels, tmp_path) as traffic:
        http = [traffic.http_publisher(f"http-{i}", lose_every=3) for i in (1, 2)]
        sio = traffic.socketio_publisher("sio-1", lose_every=3)
        traffic.py_subscriber("py-websocket", "websocket")
        traffic.py_subscriber("py-msgpack-polling", "msgpack-polling")
        traffic.js_subscriber("js-default", "default")
        traffic.js_subscriber("js-msgpack-websocket", "msgpack-websocket")
        traffic.start()
        traffic.wait_published(15)
        wait_until(lambda: all(len([a for a in traffic.ledger.acks(p.name) if a.retried]) >= 4
                               for p in (*http, sio)), timeout=15, interval=0.05,
                   message="4 retried publications per publisher")
        traffic.stop_publishers()
        assert all(p.lost_answers >= 4 for p in http), [p.lost_answers for p in http]
        traffic.settle()
        traffic.check(data_kept=True)
        for channel in channels:
            publications = history_of(cluster.url, channel)["publications"]
            keys = [data_key(p["data"]) for p in publications]
            doubled = {k: n for k, n in collections.Counter(keys).items() if n > 1}
            assert not doubled, f"{channel}: published more than once: {doubled}"
            at = {data_key(p["data"]): p["offset"] for p in publications}
            for acked in traffic.ledger.acks():
                if acked.channel == channel and acked.retried:
                    assert at.get(acked.data_key) == acked.offset, (
                        f"{channel}: the retry of {acked.data_key} was answered offset "
                        f"{acked.offset}; history has it at {at.get(acked.data_key)}")


def test_a_retry_through_nginx_after_the_answering_node_died_gets_the_original_answer(tmp_path):
    run = uuid.uuid4().hex[:8]
    channels = [f"idem-{run}-{i}" for i in range(3)]
    with running_cluster(tmp_path) as cluster, contextlib.ExitStack() as cleanup:
        victim = "n2"
        direct = cluster.node_urls[victim]
        client = connect_client(direct, "websocket", f"publisher-{run}")
        cleanup.callback(client.disconnect)
        api = requests.Session()
        cleanup.callback(api.close)

        # Answered by the victim...
        event_key, publish_key, broadcast_key = (f"{kind}-{run}" for kind in
                                                 ("event", "publish", "broadcast"))
        event = {"channel": channels[0], "data": {"via": "event"}, "idempotency_key": event_key}
        first_event = client.call("publish", event, timeout=10)
        assert first_event["ok"], first_event
        publish = {"channel": channels[1], "data": {"via": "api"},
                   "idempotency_key": publish_key}
        first_publish = api.post(direct + "/api/publish", json=publish, timeout=10)
        assert first_publish.status_code == 200, first_publish.text
        broadcast = {"channels": channels, "data": {"via": "broadcast"},
                     "idempotency_key": broadcast_key}
        first_broadcast = api.post(direct + "/api/broadcast", json=broadcast, timeout=10)
        assert first_broadcast.status_code == 200, first_broadcast.text

        # ... which dies before its answers reach anyone: the clients retry through nginx.
        cluster.kill_node(victim)
        retried_event = connect_client(cluster.url, "websocket", f"publisher-{run}")
        cleanup.callback(retried_event.disconnect)
        assert node_of(retried_event.eio.sid) != victim
        answer = retried_event.call("publish", event, timeout=10)
        assert answer == first_event, (answer, first_event)
        answer = requests.post(cluster.url + "/api/publish", json=publish, timeout=10)
        assert (answer.status_code, answer.json()) == (200, first_publish.json())
        answer = requests.post(cluster.url + "/api/broadcast", json=broadcast, timeout=10)
        assert (answer.status_code, answer.json()) == (200, first_broadcast.json())

        # The emitter: a retry of the same key answers the first position.
        with Emitter(cluster.redis_url) as emitter:
            emitted = emitter.publish(channels[2], {"via": "emitter"},
                                      idempotency_key=f"emitter-{run}")
            again = emitter.publish(channels[2], {"via": "emitter"},
                                    idempotency_key=f"emitter-{run}")
        assert again == emitted

        # Exactly one publication per channel and attempt, where the answers say.
        expected = {channels[0]: ["event", "broadcast"], channels[1]: ["api", "broadcast"],
                    channels[2]: ["broadcast", "emitter"]}
        for channel, vias in expected.items():
            publications = history_of(cluster.url, channel)["publications"]
            assert [p["data"]["via"] for p in publications] == vias, (channel, publications)
        assert first_event["offset"] == 1 and first_publish.json()["offset"] == 1
        assert [r["offset"] for r in first_broadcast.json()["results"]] == [2, 2, 1]
        assert emitted.offset == 2

        # A key that is not a string of 1 to 64 characters is a bad request.
        for bad in ("k" * 65, "", 7, ["k"]):
            body = {"channel": channels[0], "data": 1, "idempotency_key": bad}
            answer = requests.post(cluster.url + "/api/publish", json=body, timeout=10)
            assert answer.status_code == 400, (bad, answer.status_code, answer.text)
            assert answer.json()["error"]["code"] == "bad_request", answer.text
            ack = retried_event.call("publish", body, timeout=10)
            assert ack["ok"] is False and ack["error"]["code"] == "bad_request", (bad, ack)
        assert len(history_of(cluster.url, channels[0])["publications"]) == 2


# -- the checker itself -----------------------------------------------------------------------


class RecordedSubscriber(Subscriber):
    """A subscriber whose record is given: for checking the checker."""

    language = "recorded"

    def __init__(self, records: list[dict]) -> None:
        super().__init__("sub", "", "none", ["ch"], Clock())
        for rec in records:
            self.record(**rec)


def subscribed(epoch: str = "E1", offset: int = 1, since: dict | None = None,
               recovered: bool = False, publications: tuple[int, ...] = ()) -> dict:
    return {"kind": "subscribed", "channel": "ch", "since": since,
            "ack": {"ok": True, "channel": "ch", "epoch": epoch, "offset": offset,
                    "recovered": recovered,
                    "publications": [{"channel": "ch", "offset": o, "data": {"pub": "p", "seq": o},
                                      "user": None} for o in publications]}}


def message(offset: int, seq: int | None = None, epoch_number: int = 0) -> dict:
    seq = offset + 100 * epoch_number if seq is None else seq
    return {"kind": "message", "channel": "ch", "offset": offset,
            "data": {"pub": "p", "seq": seq}, "user": None}


def check_recorded(records: list[dict], acked: dict[str, range], data_kept: bool = True,
                   ) -> list[str]:
    """The checker's problems with a subscriber of ``ch`` that recorded ``records``; publisher
    ``p`` was answered offsets ``acked[epoch]`` for seq = offset + 100 x the epoch's number."""
    ledger = Ledger(Clock())
    for number, (epoch, offsets) in enumerate(acked.items()):
        for offset in offsets:
            ledger.ack("p", offset + 100 * number, "ch", {"epoch": epoch, "offset": offset})
    return check_streams([RecordedSubscriber([{"kind": "connect", "sid": "n1.x"}, *records])],
                         ledger, ["ch"], data_kept=data_kept)


def test_the_checker_finds_every_kind_of_broken_stream():
    whole = [subscribed(), *(message(o) for o in range(2, 7))]
    assert check_recorded(whole, {"E1": range(1, 7)}) == []

    def one_problem(records: list[dict], acked: dict[str, range], *words: str,
                    data_kept: bool = True) -> None:
        problems = check_recorded(records, acked, data_kept)
        assert problems, "the checker saw nothing wrong"
        assert all(word in problems[0] for word in words), problems

    gap = [subscribed(), message(2), message(5), message(6)]
    one_problem(gap, {"E1": range(1, 7)}, "sub (recorded none): ch:", "unannounced gap",
                "offsets 3-4", "2 of them acknowledged")
    one_problem([subscribed(), message(2), message(3), message(3)], {"E1": range(1, 4)},
                "duplicate: offset 3")
    one_problem([subscribed(), message(3), message(2)], {"E1": range(1, 4)}, "unannounced gap")
    assert any("reordered: message at offset 2" in p for p in
               check_recorded([subscribed(), message(3), message(2)], {"E1": range(1, 4)}))
    one_problem([subscribed(), message(2)], {"E1": range(1, 5)}, "2 acknowledged publications "
                "never delivered", "offsets 3-4", "{pub: p, seq: 3}")
    one_problem([subscribed(), message(2, seq=9)], {"E1": range(1, 3)},
                "offset 2 (epoch 'E1') carried ('p', 9)")
    one_problem([message(1), subscribed()], {"E1": range(1, 2)}, "before its subscribe ack")
    # A subscriber that ends disconnected is reported even if it got everything.
    one_problem([*whole, {"kind": "disconnect", "reason": "transport close"}],
                {"E1": range(1, 7)}, "ended disconnected")

    # Announced gaps: fine when Redis lost its data, a failure when it kept it.
    reset = [subscribed(), message(2), {"kind": "reset", "channel": "ch", "epoch": "E2",
                                        "offset": 2}, message(3, epoch_number=1)]
    acked = {"E1": range(1, 5), "E2": range(1, 4)}
    assert check_recorded(reset, acked, data_kept=False) == []
    one_problem(reset, acked, "reset moved the stream from 'E1':2 to 'E2':2")
    resubscribed = [subscribed(), message(2), {"kind": "disconnect", "reason": "x"},
                    {"kind": "connect", "sid": "n2.y"},
                    subscribed("E2", 2, since={"epoch": "E1", "offset": 2}),
                    message(3, epoch_number=1)]
    assert check_recorded(resubscribed, acked, data_kept=False) == []
    one_problem(resubscribed, acked, "recovered: false moved the stream")
    # A new stream without an announcement is reported once, and followed from there.
    silent = [subscribed(), message(2), message(3), *(message(o, epoch_number=1)
                                                      for o in (1, 2, 3))]
    problems = check_recorded(silent, acked, data_kept=False)
    assert "changed epoch without a reset" in problems[0], problems
    assert "belongs to epoch 'E2', the subscriber was at 'E1':3; 1 of them acknowledged, " \
           "e.g. offset 4" in problems[0], problems
    assert len(problems) == 2 and "never delivered" in problems[1], problems
    # ... but never a loss after the announcement.
    one_problem(reset[:-1], acked, "never delivered", "epoch 'E2' offsets 3", data_kept=False)
    # A recovery that skips a publication is a gap.
    recovered = [subscribed(), message(2), {"kind": "disconnect", "reason": "x"},
                 {"kind": "connect", "sid": "n2.y"},
                 subscribed("E1", 5, since={"epoch": "E1", "offset": 2}, recovered=True,
                        publications=(3, 5))]
    one_problem(recovered, {"E1": range(1, 6)}, "unannounced gap", "offsets 4",
                "a recovered publication at offset 5")
    # Epoch "" (no stream yet when subscribed) is the epoch the first publication created.
    empty = [subscribed("", 0), message(1), message(2)]
    assert check_recorded(empty, {"E1": range(1, 3)}) == []
