"""The benchmark suite runs end to end on a tiny configuration (it measures nothing here).

``bench/run.py floor idle fanout browser --quick --targets realtime``: the floor, a few idle
clients on one node, a fanout of 20 subscribers at 20 publishes/s for 1.5 s through a real
cluster (redis-server, two nodes, nginx), and 20 official socket.io-client clients per browser
variant. Every published message must reach every subscriber once, in order: a bench that
counts nothing, or a server that drops a delivery, fails this test.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.processes import REPO


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "floor", "idle", "fanout", "browser", "--quick",
         "--targets", "realtime", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=150, check=False)
    return completed, out


def test_the_quick_run_exits_cleanly_and_writes_its_reports(quick_run):
    completed, out = quick_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    for name in ("results.json", "results.md"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"meta", "settings", "floor", "scenarios", "targets"}
    assert set(results["scenarios"]) == {"idle", "fanout", "browser"}
    assert "## Fanout" in (out / "results.md").read_text()


def test_the_floor_is_measured(quick_run):
    _, out = quick_run
    floor = json.loads((out / "results.json").read_text())["floor"]
    assert [row["frames_per_send"] for row in floor["results"]] == [1, 2, 4]
    for row in floor["results"]:
        assert row["sends"] > 0
        assert 0 < row["us_per_frame"] < 1000


def test_idle_clients_connect_and_cost_memory(quick_run):
    _, out = quick_run
    idle = json.loads((out / "results.json").read_text())["scenarios"]["idle"]["realtime"]
    run = idle["runs"][0]
    assert "error" not in run, run
    assert run["connected"] == run["connections"] > 0
    assert run["handshakes_per_s"] > 0
    assert run["dropped_while_idle"] == 0
    assert idle["summary"]["kb_per_connection"] is not None


def test_fanout_delivers_every_message_once_and_in_order(quick_run):
    _, out = quick_run
    fanout = json.loads((out / "results.json").read_text())["scenarios"]["fanout"]["realtime"]
    run = fanout["runs"][0]
    assert "error" not in run, run
    assert run["connect"]["subscribed"] == run["subscribers"] > 0
    assert run["steps"], "no fanout step ran"
    for step in run["steps"]:
        assert step["published"] > 0
        assert step["publish_errors"] == 0
        assert step["expected"] == step["published"] * run["subscribers"]
        assert step["delivered"] == step["expected"] > 0
        assert step["lost"] == 0
        assert step["duplicated"] == 0
        assert step["reordered"] == 0
        assert step["p50_ms"] is not None and step["p50_ms"] >= 0
        assert step["cpu_us_per_delivery"] is not None and step["cpu_us_per_delivery"] > 0


def test_browser_clients_connect_on_every_variant_and_get_everything(quick_run):
    _, out = quick_run
    browser = json.loads((out / "results.json").read_text())["scenarios"]["browser"]
    run = browser["realtime"]["runs"][0]
    assert "error" not in run, run
    assert set(run) == {"websocket-json", "default-json", "websocket-msgpack",
                        "default-msgpack"}
    for variant in run.values():
        # default-start clients count as connected once upgraded: all end on a WebSocket
        assert variant["transports"] == {"websocket": variant["clients"]}
        assert variant["delivered"] == variant["expected"] > 0
        assert variant["lost"] == variant["duplicated"] == variant["reordered"] == 0
        assert variant["cpu_us_per_delivery"] > 0 and variant["kb_per_connection"] is not None
    targets = {t["number"]: t for t in json.loads((out / "results.json").read_text())["targets"]}
    assert all(targets[n]["pass"] is not None for n in ("B1", "B2", "B3", "B4"))
