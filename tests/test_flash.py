"""Flashing an agent onto an emulated device (dir:) and over real SSH to a loopback sshd."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.local.broker import free_port, wait_for_port
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
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host'}\n"
        f"AuthorizedKeysFile {directory / 'authorized_keys'}\n"
        f"PidFile {directory / 'sshd.pid'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nUsePAM no\nStrictModes no\n"
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
    return [
        "flash",
        bundle,
        "--target",
        target,
        "--device-id",
        device,
        "--fleet",
        fleet,
        "--broker",
        broker.url,
        "--pubkey",
        keypair[1],
        "--python",
        sys.executable,
        "--system-site-packages",
        "--wheel-dir",
        wheels,
        "--wait",
        "60",
    ]


def test_dry_run_prints_every_step_and_changes_nothing(cli, bundle, keypair, tmp_path):
    target = tmp_path / "dev"
    result = cli(
        "flash",
        bundle,
        "--target",
        f"dir:{target}",
        "--device-id",
        "d1",
        "--broker",
        "mqtt://127.0.0.1:1883",
        "--pubkey",
        keypair[1],
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    assert "[dry-run] copy" in result.stdout and 'edge-agent" install' in result.stdout and "-m venv" in result.stdout
    assert not target.exists()


def test_an_ssh_target_path_is_the_install_root(cli, bundle, keypair):
    result = cli(
        "flash",
        bundle,
        "--target",
        "ssh://pi@192.0.2.1:2222/srv/edge kit",
        "--device-id",
        "d1",
        "--broker",
        "mqtt://127.0.0.1:1883",
        "--pubkey",
        keypair[1],
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    assert (
        "(root /srv/edge kit)" in result.stdout
        and "ROOT='/srv/edge kit'" in result.stdout
        and "/home/pi/edgekit" not in result.stdout
    )
    climbing = cli(
        "flash",
        bundle,
        "--target",
        "ssh://pi@192.0.2.1/srv/../etc",
        "--device-id",
        "d1",
        "--broker",
        "mqtt://127.0.0.1:1883",
        "--pubkey",
        keypair[1],
        "--dry-run",
    )
    assert climbing.exit_code == 2 and "'..'" in climbing.output


def test_system_site_packages_reaches_a_virtualenv_interpreters_packages(tmp_path):
    """--python may be a venv's python: the device venv must see that venv's packages, not only its base's."""
    parent = tmp_path / "parent"
    subprocess.run([sys.executable, "-m", "venv", str(parent)], check=True)
    site = Path(
        subprocess.check_output(
            [str(parent / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    (site / "only_in_parent_venv.py").write_text("VALUE = 42\n")
    from edgekit.local.flash import Flasher, FlashPlan

    plan = FlashPlan(
        bundle=Path("b"),
        device_id="d",
        fleet="f",
        broker="mqtt://127.0.0.1:1",
        pubkey=Path("k"),
        target="dir:/x",
        python=str(parent / "bin" / "python"),
        system_site_packages=True,
    )
    script = Flasher(plan)._install_script(str(tmp_path / "device"), ssh=False)
    setup = "\n".join(line for line in script.splitlines() if "pip install" not in line and "edge-agent" not in line)
    subprocess.run(["bash", "-c", setup], check=True)
    value = subprocess.check_output(
        [str(tmp_path / "device" / "venv" / "bin" / "python"), "-c", "import only_in_parent_venv as m; print(m.VALUE)"],
        text=True,
    )
    assert value.strip() == "42"


def test_flash_an_emulated_device_and_see_it_come_online(cli, bundle, keypair, broker, fleet_name, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    collector = Collector(broker.url, fleet_name)
    target = tmp_path / "dev1"
    result = cli(
        *flash_args(bundle, keypair, broker, fleet_name, "dev1", f"dir:{target}", wheels),
        "--start",
        "--listen",
        "127.0.0.1:0",
    )
    try:
        assert result.exit_code == 0, result.output
        assert "online: dev1 runs digits v3" in result.stdout
        assert (target / "etc" / "agent.toml").exists() and (target / "venv" / "bin" / "edge-agent").exists()
        assert (target / "state" / "slots").is_dir()
        again = cli(
            *flash_args(bundle, keypair, broker, fleet_name, "dev1", f"dir:{target}", wheels),
            "--start",
            "--listen",
            "127.0.0.1:0",
        )
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
    result = cli(
        *flash_args(bundle, keypair, broker, fleet_name, "pi-test", target, wheels),
        "--identity",
        sshd["identity"],
        "--ssh-option",
        "StrictHostKeyChecking=no",
        "--ssh-option",
        "UserKnownHostsFile=/dev/null",
        "--listen",
        "127.0.0.1:0",
    )
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
