"""Loading models and data, comparing them, timing them, and what a target runtime accepts.

Imports: edgekit.errors, edgekit.fsutil, device_agent (shared formats).
Nothing from build/, bundle/, fleet/, local/ or cli/.
"""
