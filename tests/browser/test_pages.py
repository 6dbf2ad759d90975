"""The chat, notifications and admin pages in real Chromium, through nginx on a 3-node cluster.

One cluster (redis, nodes n1..n3, nginx) serves the whole module; each test opens its own pages
(each in a browser context of its own, like separate browsers) and uses channels and user names
no other test uses. Node ids come from the Engine.IO session ids the pages use ("n2.AbC...").
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator

import pytest
import requests
from playwright.sync_api import Page, Route, expect

from realtime_dev.cluster import LocalCluster
from realtime_dev.processes import NodeProcess
from tests.browser.conftest import PHONE, TrackedPage

OpenPage = Callable[..., TrackedPage]
NO_VALUE = "\N{EN DASH}"  # what the admin page shows for a value it does not have (yet)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(workdir=tmp_path_factory.mktemp("browser-cluster"), nodes=3).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def every_node_running(cluster: LocalCluster) -> Iterator[None]:
    """A test that kills a node leaves it running again for the next one."""
    yield
    for node_id in cluster.node_ids:
        if not cluster.node(node_id).alive():
            cluster.start_node(node_id)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def join_chat(tracked: TrackedPage, name: str, room: str) -> None:
    page = tracked.page
    page.fill("#name-input", name)
    page.fill("#room-input", room)
    page.click("#join-button")
    expect(page.locator("#send-button")).to_be_enabled()  # subscribed


def say(page: Page, text: str) -> None:
    page.fill("#message-input", text)
    page.press("#message-input", "Enter")


def bubbles(page: Page):
    return page.locator("#messages .msg-bubble")


def open_chats_on_two_nodes(open_page: OpenPage, url: str,
                            room: str) -> tuple[TrackedPage, TrackedPage]:
    """alice's and bob's chat pages in ``room``, their connections held by different nodes.

    nginx sends each new session to the node with the fewest connections, so bob usually
    lands elsewhere; if he does not, his page reloads (a new session, the room rejoined from
    localStorage) until he does.
    """
    alice = open_page(url, name="alice")
    join_chat(alice, "alice", room)
    bob = open_page(url, name="bob")
    join_chat(bob, "bob", room)
    for _ in range(10):
        if bob.node != alice.node:
            return alice, bob
        bob.page.reload()
        expect(bob.page.locator("#send-button")).to_be_enabled()
    raise AssertionError(f"every session of bob's page went to {alice.node}, like alice's")


def test_two_chat_pages_on_different_nodes_chat_both_ways_and_see_each_other_online(
        cluster: LocalCluster, open_page: OpenPage) -> None:
    alice, bob = open_chats_on_two_nodes(open_page, cluster.url + "/index.html",
                                         unique("lobby-"))

    for tracked, other in ((alice, "bob"), (bob, "alice")):
        expect(tracked.page.locator("#presence-list")).to_contain_text(other)

    say(alice.page, "hello bob, from " + alice.node)
    expect(bubbles(bob.page)).to_have_text(["hello bob, from " + alice.node])
    say(bob.page, "hi alice, from " + bob.node)
    expect(bubbles(alice.page)).to_have_text(["hello bob, from " + alice.node,
                                              "hi alice, from " + bob.node])
    expect(bubbles(bob.page)).to_have_text(["hello bob, from " + alice.node,
                                            "hi alice, from " + bob.node])


def test_admin_page_shows_the_three_nodes_of_the_cluster_and_a_busy_channel(
        cluster: LocalCluster, open_page: OpenPage) -> None:
    room = unique("watched-")
    chat = open_page(cluster.url + "/index.html", name="chat")
    join_chat(chat, "erin", room)

    admin = open_page(cluster.url + "/admin.html", name="admin")
    page = admin.page
    rows = page.locator("#nodes-table tbody tr")
    # Without API keys the API answers loopback clients: no sign-in asked for.
    expect(rows).to_have_count(3)
    assert [rows.nth(i).get_attribute("data-node") for i in range(3)] == ["n1", "n2", "n3"]
    expect(page.locator("#total-nodes")).to_have_text("3")
    expect(page.locator("#login-form")).to_be_hidden()
    expect(page.locator("#admin-status")).to_have_text("Live")
    expect(page.locator("#stats-notice")).to_be_hidden()  # /api/stats answered, not /api/info
    # erin's subscription, counted by the node that holds her session and listed cluster-wide.
    expect(page.locator("#channels-list .bar-row", has_text=f"chat:{room}")).to_contain_text("1")
    expect(page.locator(f'#nodes-table tr[data-node="{chat.node}"] td[data-label="connections"]')
           ).not_to_have_text("0")


def test_chat_page_whose_node_is_killed_shows_reconnecting_then_the_messages_it_missed(
        cluster: LocalCluster, open_page: OpenPage, every_node_running: None) -> None:
    alice, bob = open_chats_on_two_nodes(open_page, cluster.url + "/index.html",
                                         unique("crash-"))
    say(alice.page, "before the crash")
    expect(bubbles(bob.page)).to_have_text(["before the crash"])

    # Keep bob away until alice has published: his reconnects fail while this route holds.
    blocked = "**/socket.io/**"
    bob.context.route(blocked, lambda route: route.abort())
    killed = bob.node
    cluster.kill_node(killed)
    expect(bob.page.locator("#conn-badge")).to_have_text("Reconnecting…")
    expect(bob.page.locator("#conn-badge")).to_have_attribute("data-state", "reconnecting")

    missed = [f"while bob was away {i}" for i in range(1, 4)]
    for text in missed:
        say(alice.page, text)
    expect(bubbles(alice.page)).to_have_text(["before the crash", *missed])
    expect(bob.page.locator("#conn-badge")).to_have_text("Reconnecting…")  # still away

    bob.context.unroute(blocked)
    expect(bob.page.locator("#conn-badge")).to_have_text("Online")
    expect(bubbles(bob.page)).to_have_text(["before the crash", *missed])
    assert bob.node != killed, bob.session_ids  # a live node took him in
    say(bob.page, "back again")
    expect(bubbles(alice.page)).to_have_text(["before the crash", *missed, "back again"])


def test_notifications_page_shows_and_counts_a_notification_sent_through_the_http_api(
        cluster: LocalCluster, open_page: OpenPage) -> None:
    user = unique("carol")
    notes = open_page(cluster.url + "/notifications.html", name="notifications")
    notes.page.fill("#name-input", user)
    notes.page.click("#connect-button")
    expect(notes.page.locator("#conn-badge")).to_have_text("Online")
    expect(notes.page.locator("#notif-empty-text")).to_contain_text("No notifications yet")
    expect(notes.page.locator("#unread-count")).to_have_text("0")

    answer = requests.post(cluster.url + "/api/publish", timeout=10, json={
        "channel": f"user:{user}", "data": {"title": "Report ready", "body": "Q3 is done."}})
    assert answer.status_code == 200, answer.text

    expect(notes.page.locator("#notif-list .notif-title")).to_have_text(["Report ready"])
    expect(notes.page.locator("#notif-list .notif-body")).to_have_text(["Q3 is done."])
    expect(notes.page.locator("#unread-count")).to_have_text("1")


def test_chat_page_on_a_phone_connects_at_once_and_keeps_name_and_room_across_a_reload(
        cluster: LocalCluster, open_page: OpenPage) -> None:
    room = unique("phone-")
    chat = open_page(cluster.url + "/index.html", name="phone", viewport=PHONE)
    page = chat.page
    # Connected before anyone typed anything (anonymously until a name is given).
    expect(page.locator("#conn-badge")).to_have_text("Online")
    join_chat(chat, "dana", room)
    say(page, "from my phone")
    expect(bubbles(page)).to_have_text(["from my phone"])
    assert _no_horizontal_scroll(page)

    page.reload()
    expect(page.locator("#name-input")).to_have_value("dana")
    expect(page.locator("#room-input")).to_have_value(room)
    expect(page.locator("#room-title")).to_have_text(f"#{room}")
    expect(bubbles(page)).to_have_text(["from my phone"])
    expect(page.locator("#presence-list")).to_contain_text("dana")
    assert _no_horizontal_scroll(page)
    for selector in ("#message-input", "#send-button", "#join-button"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], selector
    # In a room the conversation fits one screen: the composer is in view without scrolling,
    # however many messages there are (they scroll inside their own box).
    for i in range(30):
        say(page, f"filler {i}")
    expect(bubbles(page)).to_have_count(31)
    page.evaluate("window.scrollTo(0, 0)")
    box = page.locator("#message-input").bounding_box()
    assert box and box["y"] + box["height"] <= PHONE["height"], box


def test_chat_page_badge_says_connecting_until_the_first_connection_then_online(
        cluster: LocalCluster, open_page: OpenPage) -> None:
    chat = open_page("about:blank", name="first-second")
    held = "**/socket.io/**"
    chat.context.route(held, lambda route: route.abort())  # the server is out of reach
    chat.page.goto(cluster.url + "/index.html")
    badge = chat.page.locator("#conn-badge")
    expect(badge).to_have_attribute("data-state", "connecting")
    expect(badge).to_have_text("Connecting…")
    chat.context.unroute(held)
    expect(badge).to_have_text("Online")


def _no_horizontal_scroll(page: Page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_admin_page_turns_counters_into_rates_and_reads_a_counter_going_down_as_a_restart(
        cluster: LocalCluster, open_page: OpenPage) -> None:
    """/api/stats replayed from a script (its contract), the page's clock run by hand."""
    snapshots = [_stats(1000.0, publications=100, deliveries=1000),
                 _stats(1002.0, publications=120, deliveries=1400),  # +20/2 s, +400/2 s
                 _stats(1004.0, publications=6, deliveries=50)]  # restarted: 6 and 50 since
    served: list[int] = []

    def serve(route: Route) -> None:
        index = min(len(served), len(snapshots) - 1)
        served.append(index)
        route.fulfill(status=200, content_type="application/json",
                      body=json.dumps(snapshots[index]))

    admin = open_page("about:blank", name="admin-rates")
    page = admin.page
    page.clock.install()
    page.route("**/api/stats", serve)
    page.goto(cluster.url + "/admin.html")
    expect(page.locator("#total-publications-rate")).to_have_text(NO_VALUE)  # one reading
    page.clock.run_for(2000)
    expect(page.locator("#total-publications-rate")).to_have_text("10.0")
    expect(page.locator("#total-deliveries-rate")).to_have_text("200")
    page.clock.run_for(2000)
    expect(page.locator("#total-publications-rate")).to_have_text("3.00")
    expect(page.locator("#total-deliveries-rate")).to_have_text("25.0")
    expect(page.locator("#channels-list .bar-label")).to_have_text(["chat:busy", "chat:quiet"])
    expect(page.locator("#disconnects-list .bar-label")).to_have_text(
        ["transport close", "ping timeout"])
    expect(page.locator('#nodes-table tr[data-node="n1"] td[data-label="uptime"]')).to_have_text(
        "1h 01m")

    page.unroute("**/api/stats")
    page.route("**/api/stats", lambda route: route.abort())  # the API out of reach
    page.clock.run_for(2000)
    expect(page.locator("#admin-status")).to_have_text("Unreachable")
    expect(page.locator("#nodes-table tbody tr")).to_have_count(1)  # the last figures stay
    page.unroute("**/api/stats")
    page.route("**/api/stats", serve)
    page.clock.run_for(2000)
    expect(page.locator("#admin-status")).to_have_text("Live")


def _stats(time: float, *, publications: int, deliveries: int) -> dict:
    return {"time": time, "channels": [{"channel": "chat:busy", "subscribers": 7},
                                       {"channel": "chat:quiet", "subscribers": 2}],
            "nodes": [{"node": "n1", "uptime": 3660.0, "connections": 9,
                       "transports": {"websocket": 7, "polling": 2}, "subscriptions": 9,
                       "channels": 2, "publications": publications, "deliveries": deliveries,
                       "disconnects": {"transport close": 4, "ping timeout": 1},
                       "updated": time}]}


def test_admin_page_asks_for_the_api_key_and_keeps_it_in_the_tab_only(
        tmp_path, open_page: OpenPage) -> None:
    key = "browser-test-" + uuid.uuid4().hex
    node = NodeProcess(tmp_path, "keyed", "--api-key", key).wait_ready()
    try:
        admin = open_page(node.url + "/admin.html", name="admin-key")
        page = admin.page
        expect(page.locator("#login-form")).to_be_visible()  # 401 without a key
        expect(page.locator("#dashboard")).to_be_hidden()

        page.fill("#api-key-input", "not-the-key")
        page.click("#login-button")
        expect(page.locator("#login-error")).to_have_text("That API key was refused.")

        page.fill("#api-key-input", key)
        page.click("#login-button")
        expect(page.locator("#nodes-table tbody tr")).to_have_count(1)
        expect(page.locator("#login-form")).to_be_hidden()
        storage = page.evaluate("({session: {...sessionStorage}, local: {...localStorage}})")
        assert key in storage["session"].values()
        assert key not in json.dumps(storage["local"])
        assert key not in json.dumps(admin.context.cookies())

        page.reload()  # the same tab: still signed in
        expect(page.locator("#nodes-table tbody tr")).to_have_count(1)
        # Another tab of the same browser shares localStorage and cookies, not the key.
        other_tab = admin.context.new_page()
        other_tab.goto(node.url + "/admin.html")
        expect(other_tab.locator("#login-form")).to_be_visible()

        page.click("#sign-out-button")
        expect(page.locator("#login-form")).to_be_visible()
        assert page.evaluate("sessionStorage.length") == 0
    finally:
        node.stop()
