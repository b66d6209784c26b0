"""``edge-agent``: the device program. Standard library argparse only: a device carries no click.

    edge-agent install digits-3.edgebundle --config agent.toml     # verify, then place in the active slot
    edge-agent run --config agent.toml                             # serve, monitor, report until SIGTERM
    edge-agent predict --config agent.toml rows.csv > preds.csv    # batch scoring with the active model
    edge-agent verify digits-3.edgebundle --pubkey edgekit.pub     # check signature and hashes only

Exit codes: 0 success, 2 an error (one line on stderr saying what is wrong and what to do).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import signal
import sys
import threading

import numpy as np

from .errors import AgentError, InputError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="edgekit device agent", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("install", help="verify a bundle and make it the active model", description="example: edge-agent install digits-3.edgebundle --config agent.toml")
    install.add_argument("bundle")
    install.add_argument("--config", required=True)
    install.add_argument("--allow-downgrade", action="store_true", help="install even if the version is not newer")
    run = commands.add_parser("run", help="serve the active model, monitor it and report over MQTT", description="example: edge-agent run --config agent.toml")
    run.add_argument("--config", required=True)
    predict = commands.add_parser("predict", help="score a CSV or NPZ file with the active model", description="example: edge-agent predict --config agent.toml rows.csv > preds.csv")
    predict.add_argument("--config", required=True)
    predict.add_argument("data")
    predict.add_argument("--label", help="label column of the CSV, left out of the features")
    verify = commands.add_parser("verify", help="check a bundle's signature and hashes", description="example: edge-agent verify digits-3.edgebundle --pubkey edgekit.pub")
    verify.add_argument("bundle")
    verify.add_argument("--pubkey", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return {"install": _install, "run": _run, "predict": _predict, "verify": _verify}[args.command](args)
    except AgentError as exc:
        if args.debug:
            raise
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2


def _install(args: argparse.Namespace) -> int:
    from .config import load_config
    from .signing import load_public_key
    from .state import StateDir

    config = load_config(args.config)
    bundle = StateDir(config.state_dir).install(args.bundle, load_public_key(config.public_key), allow_downgrade=args.allow_downgrade)
    print(json.dumps({"installed": bundle.name, "version": bundle.version, "state_dir": str(config.state_dir)}))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .agent import Agent
    from .config import load_config

    agent = Agent(load_config(args.config)).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("device_agent").info("serving %s v%s as %s/%s", agent.model_info["name"], agent.model_info["version"], agent.config.fleet, agent.config.device_id)
    stop.wait()
    agent.stop()
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .config import load_config
    from .runtimes import open_runtime
    from .signing import load_public_key
    from .state import StateDir
    from .tabular import TableError, column_order, read_table

    config = load_config(args.config)
    bundle = StateDir(config.state_dir).active_bundle(load_public_key(config.public_key))
    try:
        X, _, names = read_table(args.data, args.label)
    except (TableError, OSError) as exc:
        raise InputError(f"{args.data}: {exc}") from exc
    schema = bundle.input_schema
    try:
        order = column_order(schema.feature_names, names)
    except TableError as exc:
        raise InputError(f"{args.data}: {exc}") from exc
    if order is not None:
        X = X[:, order]
    rows = schema.check(X, source=args.data)
    runtime = open_runtime(bundle.model_format, bundle.model_bytes, threads=config.threads, source=bundle.path)
    prediction = bundle.output_spec.interpret(runtime.predict(rows))
    writer = csv.writer(sys.stdout, lineterminator="\n")
    if prediction.labels is not None:
        probability_columns = [f"p_{label}" for label in bundle.output_spec.labels] if prediction.probabilities is not None else []
        writer.writerow(["prediction", *probability_columns])
        for i, label in enumerate(prediction.labels.tolist()):
            writer.writerow([label, *(np.round(prediction.probabilities[i], 6).tolist() if probability_columns else [])])
    else:
        writer.writerow([f"prediction_{j}" for j in range(prediction.values.shape[1])] if prediction.values.shape[1] > 1 else ["prediction"])
        writer.writerows(prediction.values.tolist())
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .bundle import read_bundle
    from .signing import load_public_key

    bundle = read_bundle(args.bundle, load_public_key(args.pubkey))
    print(json.dumps({"name": bundle.name, "version": bundle.version, "signed_by": bundle.signed_by, "verified": True}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
