"""The systemd unit `edgekit flash` installs starts the agent whatever the install root is called."""

import shlex
import shutil
import subprocess

import pytest

from edgekit.local.flash import UNIT, systemd_word


def _unit(root: str) -> str:
    return UNIT.format(
        user="root",
        agent=systemd_word(f"{root}/venv/bin/edge-agent", command=True),
        config=systemd_word(f"{root}/etc/agent.toml"),
    )


@pytest.mark.parametrize(
    "root", ["/opt/edgekit", "/srv/edge kit", '/srv/a "quoted" root', "/srv/back\\slash", "/srv/100%h", "/srv/$HOME/x"]
)
def test_exec_start_gives_the_agent_its_path_and_config_as_single_words(root):
    line = next(line for line in _unit(root).splitlines() if line.startswith("ExecStart="))
    words = shlex.split(
        line.removeprefix("ExecStart=").replace("%%", "%").replace("$$", "$")
    )  # systemd's quoting is the shell's here
    assert words == [f"{root}/venv/bin/edge-agent", "run", "--config", f"{root}/etc/agent.toml"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit_for_a_root_with_a_space(tmp_path):
    root = tmp_path / "edge kit $x"
    (root / "venv" / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    agent = root / "venv" / "bin" / "edge-agent"
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    unit = tmp_path / "edgekit-agent.service"
    unit.write_text(_unit(str(root)))
    verified = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stderr
