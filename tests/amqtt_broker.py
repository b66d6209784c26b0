"""Run amqtt (an MQTT 3.1.1-only broker, the demo's embedded fallback) on a port: python amqtt_broker.py PORT."""

import asyncio
import logging
import sys

from amqtt.broker import Broker


async def main(port: int) -> None:
    config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
              "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
    broker = Broker(config)
    await broker.start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main(int(sys.argv[1])))
