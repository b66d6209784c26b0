"""Running the loop on one machine: a local MQTT broker (Mosquitto or the embedded amqtt), emulated devices,
flashing an agent onto a Pi over SSH or a local directory, the fixtures, and ``edgekit demo``.

Imports: anything in edgekit but cli/; device_agent.
"""
