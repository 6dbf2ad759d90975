"""realtime_dev.processes: children run the realtime this process imported, from anywhere."""

from __future__ import annotations

import os
import subprocess

from realtime_dev.processes import node_command, node_environment
from tests.helpers import REPO


def test_a_node_started_outside_the_checkout_imports_the_checkouts_realtime(tmp_path):
    env = node_environment({"PATH": os.environ.get("PATH", ""), "PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"]
    result = subprocess.run(node_command("serve", "--help"), cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "--static-dir" in result.stdout
