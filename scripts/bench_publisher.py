#!/usr/bin/env python3
"""A QoS 1 load generator for ``bench_collector.py``: many devices' summaries over one MQTT 3.1.1 connection.

Real devices publish from their own machines; here they share the two cores with the broker and
the collector, so the load generator must cost as little CPU as possible or it, not the collector,
sets the figure. paho spends about 150 µs of Python per publish; this writes pre-encoded PUBLISH
packets in batches and counts the broker's PUBACKs on a reader thread, keeping at most ``WINDOW``
unacknowledged (so packet ids are never reused while in flight). The broker still does full QoS 1.

    python scripts/bench_publisher.py PORT FIRST COUNT RATE TEMPLATES.json

Publishes summaries FIRST .. FIRST+COUNT-1 (device ``i % 1000``, seq ``i // 1000 + 1``) at RATE a
second (0: as fast as the broker takes them) and exits when the broker has acknowledged all of them.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time

WINDOW = 2000
BATCH = 50


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: bytes) -> bytes:
    return struct.pack("!H", len(text)) + text


def connect_packet(client_id: str) -> bytes:
    body = (
        _string(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + _string(client_id.encode())
    )  # 3.1.1, clean session
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    body = _string(topic.encode()) + struct.pack("!H", packet_id) + payload
    return b"\x32" + _remaining_length(len(body)) + body  # PUBLISH, QoS 1


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return data


class Publisher:
    def __init__(self, port: int, client_id: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(connect_packet(client_id))
        connack = _read_exact(self.sock, 4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"the broker refused the connection: {connack!r}")
        self.acked = 0
        self.failure: BaseException | None = None
        threading.Thread(target=self._count_acks, daemon=True).start()

    def _count_acks(self) -> None:
        buffered = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                buffered += chunk
                whole = len(buffered) // 4 * 4  # PUBACK: 0x40 0x02 id id
                if any(buffered[i] != 0x40 for i in range(0, whole, 4)):
                    raise ConnectionError("unexpected packet from the broker")
                self.acked += whole // 4
                buffered = buffered[whole:]
        except BaseException as error:  # reported by the sending thread
            self.failure = error

    def run(self, first: int, count: int, rate: float, templates: list[str]) -> None:
        start, sent, batch = time.time(), 0, []
        for i in range(first, first + count):
            device, seq = i % 1000, i // 1000 + 1
            text = (
                templates[i % len(templates)]
                .replace('"device":"D"', f'"device":"dev{device:04d}"')
                .replace('"seq":0', f'"seq":{seq}')
            )
            batch.append(publish_packet(f"edgekit/v1/bench/dev{device:04d}/summary", text.encode(), sent % 65535 + 1))
            sent += 1
            if len(batch) == BATCH or sent == count:
                while sent - self.acked > WINDOW and self.failure is None:
                    time.sleep(0.0005)
                self._check()
                self.sock.sendall(b"".join(batch))
                batch = []
                if rate:
                    ahead = sent / rate - (time.time() - start)
                    if ahead > 0:
                        time.sleep(ahead)
        deadline = time.time() + 120
        while self.acked < count and time.time() < deadline:
            self._check()
            time.sleep(0.005)
        if self.acked < count:
            raise TimeoutError(f"the broker acknowledged {self.acked} of {count} summaries")
        self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()

    def _check(self) -> None:
        if self.failure is not None:
            raise ConnectionError(f"lost the broker: {self.failure}")


def main() -> int:
    port, first, count, rate = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    templates = json.loads(open(sys.argv[5]).read())
    Publisher(port, f"bench-publisher-{first}").run(first, count, rate, templates)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
