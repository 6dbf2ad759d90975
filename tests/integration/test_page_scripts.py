"""The pages' shared script (static/realtime-client.js) run by Node with a fake connection."""

from __future__ import annotations

import json
import shutil
import subprocess

from tests.integration.clients import JS_DIR


def run_script(name: str) -> dict:
    assert shutil.which("node"), "node is missing (scripts/setup installs it)"
    done = subprocess.run(["node", str(JS_DIR / name)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_reset_drops_what_the_page_shows_reloads_history_and_says_so():
    summary = run_script("channel_stream_reset.js")
    assert summary["beforeReset"] == [[1, "old 1"], [2, "old 2"]]
    # the old stream's messages are gone, the new one's shown once each, in order
    assert summary["afterReset"] == [[1, "new 1"], [2, "new 2"]]
    assert summary["historyAfterReset"] == 1
    assert summary["restarts"][-1] == {"newEpoch": True, "offset": 0}
    assert summary["notices"] == ["missed"] and summary["errors"] == []
    assert (summary["epoch"], summary["lastOffset"]) == ("e2", 2)
