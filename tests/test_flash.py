"""Flashing an agent onto an emulated device (dir:) and over real SSH to a loopback sshd."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.broker import free_port, wait_for_port
from tests.mqtt_helpers import Collector

pytestmark = pytest.mark.network


@pytest.fixture
def sshd(tmp_path):
    """sshd on 127.0.0.1:<free port>, a host key and an authorized client key made here."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(binary).exists() or os.geteuid() != 0:
        pytest.skip("needs openssh-server and root (scripts/test.sh installs it)")
    directory = tmp_path / "sshd"
    directory.mkdir()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / name)], check=True)
    (directory / "authorized_keys").write_text((directory / "client.pub").read_text())
    os.chmod(directory / "authorized_keys", 0o600)
    port = free_port()
    (directory / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host'}\nAuthorizedKeysFile {directory / 'authorized_keys'}\n"
        f"PidFile {directory / 'sshd.pid'}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\nStrictModes no\n"
        "PrintMotd no\nSubsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    with open(directory / "sshd.log", "wb") as log:
        process = subprocess.Popen([binary, "-D", "-e", "-f", str(directory / "sshd_config")], stderr=log)
    assert wait_for_port(port, process=process, timeout=10), (directory / "sshd.log").read_text()
    yield {"port": port, "identity": directory / "client"}
    process.terminate()
    process.wait(10)


def flash_args(bundle, keypair, broker, fleet, device, target, wheels):
    return ["flash", bundle, "--target", target, "--device-id", device, "--fleet", fleet, "--broker", broker.url, "--pubkey", keypair[1],
            "--python", sys.executable, "--system-site-packages", "--wheel-dir", wheels, "--wait", "60"]


def test_dry_run_prints_every_step_and_changes_nothing(cli, bundle, keypair, tmp_path):
    target = tmp_path / "dev"
    result = cli("flash", bundle, "--target", f"dir:{target}", "--device-id", "d1", "--broker", "mqtt://127.0.0.1:1883", "--pubkey", keypair[1], "--dry-run")
    assert result.exit_code == 0, result.output
    assert "[dry-run] copy" in result.stdout and "edge-agent\" install" in result.stdout and "-m venv" in result.stdout
    assert not target.exists()


def test_flash_an_emulated_device_and_see_it_come_online(cli, bundle, keypair, broker, fleet_name, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    collector = Collector(broker.url, fleet_name)
    target = tmp_path / "dev1"
    result = cli(*flash_args(bundle, keypair, broker, fleet_name, "dev1", f"dir:{target}", wheels), "--start", "--listen", "127.0.0.1:0")
    try:
        assert result.exit_code == 0, result.output
        assert "online: dev1 runs digits v3" in result.stdout
        assert (target / "etc" / "agent.toml").exists() and (target / "venv" / "bin" / "edge-agent").exists()
        assert (target / "state" / "slots").is_dir()
        again = cli(*flash_args(bundle, keypair, broker, fleet_name, "dev1", f"dir:{target}", wheels), "--start", "--listen", "127.0.0.1:0")
        assert again.exit_code == 0, again.output  # upgrade in place: same version is verified, not refused
    finally:
        pid = (target / "agent.pid").read_text().strip() if (target / "agent.pid").exists() else None
        if pid:
            subprocess.run(["kill", pid])
        collector.close()


def test_flash_over_ssh_runs_the_agent_and_it_reports(cli, bundle, keypair, broker, fleet_name, sshd, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    root = Path("/opt/edgekit")
    if root.exists():
        shutil.rmtree(root)
    target = f"ssh://root@127.0.0.1:{sshd['port']}"
    result = cli(*flash_args(bundle, keypair, broker, fleet_name, "pi-test", target, wheels), "--identity", sshd["identity"],
                 "--ssh-option", "StrictHostKeyChecking=no", "--ssh-option", "UserKnownHostsFile=/dev/null", "--listen", "127.0.0.1:0")
    try:
        assert result.exit_code == 0, result.output
        assert "online: pi-test runs digits v3" in result.stdout and "started:" in result.stdout
        assert (root / "etc" / "edgekit-agent.service").read_text().count("Restart=on-failure") == 1
        assert "User=edgekit" in (root / "etc" / "edgekit-agent.service").read_text()
    finally:
        pid_file = root / "agent.pid"
        if pid_file.exists():
            subprocess.run(["kill", pid_file.read_text().strip()])
        shutil.rmtree(root, ignore_errors=True)
