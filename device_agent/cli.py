"""``edge-agent``: the device program (serving, monitoring and reporting come with the agent issue).

Today it verifies and inspects bundles with the device's own reader, which needs only numpy and
cryptography: a quick check on a device that a bundle copied to it is intact and trusted.
"""

from __future__ import annotations

import argparse
import json
import sys

from .bundle import read_bundle
from .errors import AgentError
from .signing import load_public_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent", description="edgekit device agent")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check a bundle's signature and hashes", description="example: edge-agent verify digits-3.edgebundle --pubkey edgekit.pub")
    verify.add_argument("bundle")
    verify.add_argument("--pubkey", required=True)
    args = parser.parse_args(argv)
    try:
        bundle = read_bundle(args.bundle, load_public_key(args.pubkey))
    except AgentError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"name": bundle.name, "version": bundle.version, "signed_by": bundle.signed_by, "verified": True}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
