"""The benchmark suite runs end to end on a tiny configuration (it measures nothing here).

``bench/run.py floor idle fanout browser --quick --targets realtime``: the floor, a few idle
clients on one node, a fanout of 20 subscribers at 20 publishes/s for 1.5 s through a real
cluster (redis-server, two nodes, nginx), and 20 official socket.io-client clients per browser
variant. Every published message must reach every subscriber once, in order: a bench that
counts nothing, or a server that drops a delivery, fails this test.

``bench/run.py soak --quick --targets realtime``: a few seconds of connect/subscribe/receive/
disconnect churn on two nodes with a publisher and HTTP notifications; every client must get
every publication of its stay, and the report must carry the memory and descriptor figures.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


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


@pytest.fixture(scope="module")
def quick_soak(tmp_path_factory):
    out = tmp_path_factory.mktemp("soak")
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "soak", "--quick", "--targets", "realtime",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=90, check=False)
    return completed, out


SOAK_FIELDS = {
    "cycles", "cycles_per_s", "errors", "published", "notifications", "shared_expected",
    "shared_received", "shared_lost", "user_expected", "user_received", "user_lost", "lost",
    "duplicated", "reordered", "rss_start_mb", "rss_warm_mb", "rss_end_mb", "rss_after_mb",
    "rss_slope_mb_per_min", "rss_slope_max_node_mb_per_min", "fds_start", "fds_end",
    "per_node", "samples", "checks", "pass"}


def test_the_quick_soak_loses_nothing_and_reports_memory_and_descriptors(quick_soak):
    completed, out = quick_soak
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    soak = results["scenarios"]["soak"]
    assert set(soak) == {"realtime"}, "soak is realtime-only"
    run = soak["realtime"]["runs"][0]
    assert "error" not in run, run
    assert set(run) >= SOAK_FIELDS, SOAK_FIELDS - set(run)
    assert run["cycles"] > 0 and run["errors"] == 0, run["error_samples"]
    assert run["published"] > 0 and run["publish_errors"] == 0
    assert run["notifications"] > 0 and run["notify_errors"] == 0
    # Both kinds of channel were owed publications, and every one arrived, once, in order.
    for kind in ("shared", "user"):
        assert run[f"{kind}_expected"] > 0, kind
        assert run[f"{kind}_received"] == run[f"{kind}_expected"], run["lost_samples"]
        assert run[f"{kind}_lost"] == 0
    assert run["lost"] == run["duplicated"] == run["reordered"] == 0
    assert run["checks"]["no_loss"] and run["checks"]["descriptors_back"], run["checks"]
    assert set(run["checks"]) >= {"memory_flat", "descriptors_back", "no_loss"}
    # Memory and descriptors were sampled on every node, before, during and after the churn.
    phases = [sample["phase"] for sample in run["samples"]]
    assert phases[0] == "start" and phases[-2:] == ["end", "after"]
    assert phases.count("load") >= 3
    assert len(run["per_node"]) == run["nodes"] == 2
    for sample in run["samples"]:
        assert len(sample["rss_mb"]) == len(sample["fds"]) == 2
        assert all(rss > 0 for rss in sample["rss_mb"]) and all(sample["fds"])
    assert run["rss_slope_mb_per_min"] is not None and run["fds_end"] <= run["fds_start"]
    assert max(s["fds"][0] for s in run["samples"]) > run["samples"][0]["fds"][0], \
        "no client was ever connected to node 1"
    assert "## Soak (realtime)" in (out / "results.md").read_text()


def test_the_quick_notify_publishes_through_the_api_the_emitter_and_batches_losing_nothing(
        tmp_path):
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "notify", "--quick", "--targets", "realtime", "--out",
         str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (run,) = json.loads((tmp_path / "results.json").read_text())[
        "scenarios"]["notify"]["realtime"]["runs"]
    for method in ("api", "emitter", "batch"):
        for step in ("fixed_rate", "max"):
            figures = run[method][step]
            assert figures["published"] > 0, (method, step)
            assert figures["delivered"] == figures["expected"] == figures["published"]
            assert figures["lost"] == figures["duplicated"] == figures["reordered"] == 0
            assert figures["publish_errors"] == 0, (method, step)
    assert "realtime batch" in (tmp_path / "results.md").read_text()
