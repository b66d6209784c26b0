"""One agent per state dir: a second one on the same dir is refused with one line, and nothing is written."""

import os
import subprocess
import sys
import time

import pytest

from device_agent import Agent
from device_agent.errors import StateDirBusy
from tests.agent_helpers import config_of, make_device


def test_a_second_agent_on_a_running_agents_state_dir_is_refused(bundle, keypair, tmp_path):
    config = make_device(tmp_path / "dev", bundle, keypair[1], http=False)
    first = Agent(config_of(config)).start(http=False)
    try:
        with pytest.raises(StateDirBusy, match=rf"another agent \(pid {os.getpid()}\) is running on this state dir"):
            Agent(config_of(config)).start(http=False)
        assert first.predict([[0.0] * 64]).prediction is not None  # the first one is untouched
    finally:
        first.stop()
    again = Agent(config_of(config)).start(http=False)  # stopped: the dir is free again
    again.stop()


def test_edge_agent_run_twice_on_one_config_exits_with_one_line(bundle, keypair, tmp_path):
    config = make_device(tmp_path / "dev", bundle, keypair[1], http=False)
    command = [sys.executable, "-m", "device_agent", "run", "--config", str(config)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "dev" / "state" / "agent.lock"
        deadline = time.monotonic() + 30
        while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        second = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"another agent (pid {first.pid}) is running on this state dir" in lines[0], lines
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # still serving
        assert lock.read_text().strip() == f"pid {first.pid}"  # the claim is the first one's, untouched
    finally:
        first.terminate()
        first.communicate(timeout=30)
