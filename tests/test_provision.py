"""Per-device credentials and the ACL, checked against a real Mosquitto running them."""

import os
import shutil
import stat
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from edgekit.fleet.provision import COLLECTOR_USER, mosquitto_hash
from tests.mqtt_helpers import Mosquitto


def test_hash_is_what_mosquitto_passwd_writes():
    import base64

    salt = base64.b64decode("t91/dFtPp5Ldl5qS")
    expected = (
        "$7$101$t91/dFtPp5Ldl5qS$"
        "+6gtyWWugGxMuG3uipVSpxLf4FT/UWifE+StqRa5T4f7nMR9nKk+hXnmVth47eXcDcKapxBsDU1nyYTsY9XzGw=="
    )
    assert mosquitto_hash("s3cret", salt=salt, iterations=101) == expected


def test_provision_files_and_idempotence(cli, tmp_path):
    out = tmp_path / "broker"
    assert cli("fleet", "provision", "--fleet", "lab", "--devices", "d1,d2", "--out", out).exit_code == 0
    secret = (out / "credentials" / "d1.password").read_text()
    assert stat.S_IMODE(os.stat(out / "credentials" / "d1.password").st_mode) == 0o600
    assert "topic write edgekit/v1/lab/d1/summary" in (out / "acl").read_text()
    result = cli("fleet", "provision", "--fleet", "lab", "--devices", "d3", "--out", out)
    assert "new passwords for: d3" in result.stdout
    assert (out / "credentials" / "d1.password").read_text() == secret  # kept
    assert {line.split(":")[0] for line in (out / "passwd").read_text().split()} == {COLLECTOR_USER, "d1", "d2", "d3"}
    assert cli("fleet", "provision", "--devices", "bad id", "--out", out).exit_code == 2


class Client:
    def __init__(self, port, user, password):
        self.messages, self.connected, self.refused = [], threading.Event(), None
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"t-{user}-{time.time()}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.refused = str(reason_code)
        else:
            self.connected.set()

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.network
def test_a_device_cannot_publish_as_another_nor_read_its_commands(cli, tmp_path):
    out = tmp_path / "creds"
    cli("fleet", "provision", "--fleet", "lab", "--devices", "d1,d2", "--out", out)
    broker = Mosquitto(tmp_path / "broker")
    for name in ("passwd", "acl"):  # the broker reads them as the mosquitto user
        shutil.copy(out / name, broker.dir / name)
        broker.own(broker.dir / name)
    config = broker.dir / "mosquitto.conf"
    config.write_text(
        config.read_text().replace("allow_anonymous true\n", "")
        + (out / "mosquitto.conf").read_text().replace(str(out.resolve()), str(broker.dir))
    )
    broker.start()
    secret = lambda user: (out / "credentials" / f"{user}.password").read_text().strip()  # noqa: E731
    try:
        collector, d1, d2 = (
            Client(broker.port, COLLECTOR_USER, secret(COLLECTOR_USER)),
            Client(broker.port, "d1", secret("d1")),
            Client(broker.port, "d2", secret("d2")),
        )
        for c in (collector, d1, d2):
            assert c.connected.wait(5)
        intruder = Client(broker.port, "d1", "wrong password")
        time.sleep(1)
        assert not intruder.connected.is_set() and intruder.refused
        intruder.close()
        collector.client.subscribe("edgekit/v1/#", qos=1)
        d1.client.subscribe("edgekit/v1/lab/d2/cmd", qos=1)  # someone else's commands
        d1.client.subscribe("edgekit/v1/lab/d1/cmd", qos=1)
        time.sleep(0.5)
        d1.client.publish("edgekit/v1/lab/d1/summary", b"mine", qos=1).wait_for_publish(5)
        d1.client.publish("edgekit/v1/lab/d2/summary", b"forged", qos=1).wait_for_publish(5)
        collector.client.publish("edgekit/v1/lab/d2/cmd", b"for d2", qos=1).wait_for_publish(5)
        collector.client.publish("edgekit/v1/lab/d1/cmd", b"for d1", qos=1).wait_for_publish(5)
        time.sleep(1)
        heard = {t: p for t, p in collector.messages}
        assert heard.get("edgekit/v1/lab/d1/summary") == b"mine"
        assert "edgekit/v1/lab/d2/summary" not in heard  # d1 cannot publish as d2
        assert ("edgekit/v1/lab/d1/cmd", b"for d1") in d1.messages
        assert all(topic != "edgekit/v1/lab/d2/cmd" for topic, _ in d1.messages)  # nor read d2's commands
        for c in (collector, d1, d2):
            c.close()
    finally:
        broker.stop()
