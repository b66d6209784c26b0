"""The fleet collector: ingest device summaries from MQTT, store, merge, alert, show."""
