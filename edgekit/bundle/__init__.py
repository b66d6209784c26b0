"""Packaging a model as a signed, versioned bundle: the bundle builder, Ed25519 keys and lineage.

Imports: models/, build/ (the validation report it embeds), edgekit.errors, device_agent (the bundle format itself).
"""
