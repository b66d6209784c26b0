"""``edge-agent``: the device program. Standard library argparse only: a device carries no click.

    edge-agent install digits-3.edgebundle --config agent.toml     # verify, then place in the active slot
    edge-agent run --config agent.toml                             # serve, monitor, report until SIGTERM
    edge-agent predict --config agent.toml rows.csv > preds.csv    # batch scoring with the active model
    edge-agent verify digits-3.edgebundle --pubkey edgekit.pub     # check signature and hashes only

Exit codes: 0 success, 2 an error (one line on stderr saying what is wrong and what to do), 141 when the
reader of stdout went away (`| head`): quietly, as any Unix tool stopped by SIGPIPE.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from . import __version__
from .errors import AgentError, InputError

CONFIG_HELP = "the agent's agent.toml (its format is in 'edge-agent --help')"
EXIT_ERROR = 2
# What a shell reports for a program killed by SIGPIPE: `edge-agent predict … | head` under `set -o pipefail`
# behaves as it would with any Unix tool. Python ignores SIGPIPE, so the write raises instead.
EXIT_BROKEN_PIPE = 128 + 13
LABEL_LIKE = (
    "label",
    "target",
    "y",
    "class",
    "classes",
    "species",
    "outcome",
    "truth",
    "ground_truth",
    "answer",
    "category",
)


def _epilog() -> str:
    """The examples and the agent.toml format, the latter from config.py's docstring so it stays true."""
    from . import config

    _, examples, exit_codes = __doc__.split("\n\n", 2)
    toml = config.__doc__.split("::", 1)[1].split("\n\n")[1]
    return (
        f"{examples}\n\nagent.toml (TOML; relative paths are relative to the file):\n\n{toml}\n\n{exit_codes.strip()}"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="edgekit device agent: install, serve, monitor and report a model bundle",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(),
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    install = _command(
        commands,
        "install",
        "verify a bundle and make it the active model",
        "edge-agent install digits-3.edgebundle --config agent.toml",
    )
    install.add_argument("bundle", help="the .edgebundle to install (from 'edgekit package')")
    install.add_argument("--config", required=True, help=CONFIG_HELP)
    install.add_argument("--allow-downgrade", action="store_true", help="install even if the version is not newer")
    install.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a sentence")
    run = _command(
        commands, "run", "serve the active model, monitor it and report over MQTT", "edge-agent run --config agent.toml"
    )
    run.add_argument("--config", required=True, help=CONFIG_HELP)
    predict = _command(
        commands,
        "predict",
        "score a CSV or NPZ file with the active model (CSV on stdout)",
        "edge-agent predict --config agent.toml rows.csv > preds.csv",
    )
    predict.add_argument("--config", required=True, help=CONFIG_HELP)
    predict.add_argument(
        "data",
        help="a .csv with a header row, an .npz with X, or for a tensor model a folder of images, WAV or .npy files",
    )
    predict.add_argument(
        "--label",
        metavar="COLUMN",
        help="label column of the CSV, left out of the features (label, target or y are found alone)",
    )
    verify = _command(
        commands,
        "verify",
        "check a bundle's signature and hashes",
        "edge-agent verify digits-3.edgebundle --pubkey edgekit.pub",
    )
    verify.add_argument("bundle", help="the .edgebundle to check")
    verify.add_argument("--pubkey", required=True, help="the trusted public key (the .pub from 'edgekit keygen')")
    verify.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a sentence")
    return parser


def _command(commands, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=summary,
        description=f"{summary}.\n\nexample:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return {"install": _install, "run": _run, "predict": _predict, "verify": _verify}[args.command](args)
    except AgentError as exc:
        if args.debug:
            raise
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return _reader_went_away()


def _reader_went_away() -> int:
    """The reader of stdout closed it (``| head``): stop quietly. stdout is pointed at /dev/null so the
    interpreter's flush at exit does not raise again (the recipe in Python's ``signal`` documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def _emit(args: argparse.Namespace, document: dict, sentence: str) -> None:
    print(json.dumps(document, indent=2) if getattr(args, "json", False) else sentence)


def _install(args: argparse.Namespace) -> int:
    from .config import load_config
    from .signing import load_public_key
    from .state import StateDir

    config = load_config(args.config)
    state = StateDir(config.state_dir)
    before = state.state()
    bundle = state.install(args.bundle, load_public_key(config.public_key), allow_downgrade=args.allow_downgrade)
    # another model in place of the one installed is allowed (a device can change jobs), but never silently
    replaced = before.get("name") if before.get("name") not in (None, bundle.name) else None
    note = f" (in place of {replaced} v{before.get('version')})" if replaced else ""
    _emit(
        args,
        {
            "installed": bundle.name,
            "version": bundle.version,
            "state_dir": str(config.state_dir),
            **({"replaced": {"name": replaced, "version": before.get("version")}} if replaced else {}),
        },
        f"installed {bundle.name} v{bundle.version}{note} in {config.state_dir}; "
        "a running agent serves it after a restart",
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from .agent import Agent
    from .config import load_config

    agent = Agent(load_config(args.config)).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = agent.server
    logging.getLogger("device_agent").info(
        "serving %s v%s as %s/%s%s",
        agent.model_info["name"],
        agent.model_info["version"],
        agent.config.fleet,
        agent.config.device_id,
        f" on {server.scheme}://{server.server_address[0]}:{server.server_address[1]}/" if server else " (no HTTP)",
    )
    stop.wait()
    agent.stop()
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .config import load_config
    from .runtimes import open_runtime
    from .signing import load_public_key
    from .state import StateDir

    config = load_config(args.config)
    bundle = StateDir(config.state_dir).active_bundle(load_public_key(config.public_key))
    schema, spec = bundle.input_schema, bundle.output_spec
    if schema.tensor is not None:
        runtime = open_runtime(bundle.model_format, bundle.model_bytes, threads=config.threads, source=bundle.path)
        return _predict_items(args, schema, spec, runtime)
    rows = _read_rows(args, schema)
    runtime = open_runtime(bundle.model_format, bundle.model_bytes, threads=config.threads, source=bundle.path)
    _write_predictions(spec.interpret(runtime.predict(schema.feed(rows))), spec.labels)
    return 0


def _predict_items(args: argparse.Namespace, schema, spec, runtime) -> int:
    """A tensor model's answers for a folder of images or WAV files, a single one, or an .npy/.npz of
    tensors: one CSV line per item, named in the first column, written batch by batch (a folder of
    10,000 photos is never held in memory at once)."""
    from .tensor_files import read_items

    if not Path(args.data).exists():
        raise InputError(f"no such file or folder: {args.data}", "give a folder of images, WAV or .npy files")
    header = True
    for names, batch in read_items(args.data, schema.preprocessor(), schema.tensor):
        prediction = spec.interpret(runtime.predict(schema.check(batch, source=args.data)))
        _write_predictions(prediction, spec.labels, items=names, header=header)
        header = False
    if header:
        raise InputError(f"{args.data} holds no items", "give a folder of images, WAV or .npy files, or an .npz")
    return 0


def _read_rows(args: argparse.Namespace, schema) -> np.ndarray:
    """The data file's rows in the model's column order, checked; errors name the file and, when a
    column the model does not take looks like the label, the ``--label`` that would fix it."""
    from .tabular import TableError, column_order, read_table

    if not Path(args.data).is_file():
        raise InputError(f"no such file: {args.data}", "give the path of a .csv with a header row or an .npz with X")
    try:
        X, _, names = read_table(args.data, args.label, columns=schema.columns)
    except (TableError, OSError) as exc:
        raise InputError(f"{args.data}: {exc}") from exc
    try:
        order = column_order(schema.feature_names, names)
    except TableError as exc:
        raise _with_label_hint(exc, args, names, schema.feature_names, f"{args.data}: ") from exc
    try:
        return schema.check(X if order is None else X[:, order], source=args.data)
    except InputError as exc:
        raise _with_label_hint(exc, args, names, schema.feature_names) from exc


def _with_label_hint(exc: InputError, args: argparse.Namespace, names, model_names, prefix: str = "") -> InputError:
    guess = None if args.label else _label_guess(names, model_names)
    if guess is None:
        return InputError(prefix + exc.problem, exc.fix)
    return InputError(
        prefix + exc.problem,
        f"if {guess!r} is the label, rerun with --label {guess}; otherwise {exc.fix or 'drop that column'}",
    )


def _label_guess(data_names, model_names) -> str | None:
    """A column the model does not take that is probably the label: named like one, or the only stranger."""
    if data_names is None:
        return None
    strangers = [n for n in data_names if n not in model_names]
    named = [n for n in strangers if n.strip().lower() in LABEL_LIKE]
    if named:
        return named[0]
    return strangers[0] if len(strangers) == 1 and len(data_names) == len(model_names) + 1 else None


def _write_predictions(prediction, labels, *, items=None, header: bool = True) -> None:
    """CSV on stdout: the label and one probability per class (6 decimals), or the values; with
    ``items``, a first column naming the file each line answers.

    float32 outputs are widened before rounding: a float32 rounded to 6 decimals is still printed with
    its binary noise (0.12345699965953827)."""
    writer = csv.writer(sys.stdout, lineterminator="\n")
    first = ["item"] if items is not None else []
    if prediction.labels is not None:
        probabilities = (
            None if prediction.probabilities is None else np.round(prediction.probabilities.astype(np.float64), 6)
        )
        if header:
            names = [f"p_{label}" for label in labels] if probabilities is not None else []
            writer.writerow([*first, "prediction", *names])
        for i, label in enumerate(prediction.labels.tolist()):
            item = [items[i]] if items is not None else []
            writer.writerow([*item, label, *(probabilities[i].tolist() if probabilities is not None else [])])
        return
    width = prediction.values.shape[1]
    if header:
        writer.writerow([*first, *([f"prediction_{j}" for j in range(width)] if width > 1 else ["prediction"])])
    for i, row in enumerate(prediction.values):
        item = [items[i]] if items is not None else []
        writer.writerow([*item, *(str(v) for v in row)])  # numpy's shortest repr that reads back as the same float32


def _verify(args: argparse.Namespace) -> int:
    from .bundle import read_bundle
    from .signing import load_public_key

    bundle = read_bundle(args.bundle, load_public_key(args.pubkey))
    _emit(
        args,
        {
            "path": args.bundle,
            "name": bundle.name,
            "version": bundle.version,
            "signed_by": bundle.signed_by,
            "verified": True,
        },
        f"OK: {args.bundle} is {bundle.name} v{bundle.version}, signed by key {bundle.signed_by}; "
        f"{len(bundle.members)} members match their sha256",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
