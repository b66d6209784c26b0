"""``edgekit keygen``, ``package``, ``inspect`` and ``verify``."""

from __future__ import annotations

import click

from device_agent.bundle import read_bundle
from device_agent.signing import load_public_key
from edgekit.bundle.keys import generate_keypair
from edgekit.bundle.package import build_bundle
from edgekit.cli.common import emit_json, json_option
from edgekit.errors import PackageError
from edgekit.models import compare


def register(cli: click.Group) -> None:
    for command in (keygen, package, inspect, verify):
        cli.add_command(command)


@click.command()
@click.option(
    "-o",
    "--output",
    "directory",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for <name>.key and <name>.pub.",
)
@click.option("--name", default="edgekit", show_default=True, help="File name stem of the key pair.")
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
def keygen(directory, name, force):
    """Make an Ed25519 signing key pair: <name>.key (0600, stays here) and <name>.pub (for devices).

    Set EDGEKIT_KEY_PASSPHRASE to encrypt the private key.

    \b
    Example:
      edgekit keygen -o keys/
    """
    private, public, key_id = generate_keypair(directory, name=name, force=force)
    click.echo(f"wrote {private} (private: keep it here) and {public} (public: give it to devices); key id {key_id}")


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--name", required=True, help="Model name (letters, digits, '.', '_', '-').")
@click.option("--version", "version", required=True, type=int, help="Integer version; devices refuse to go down.")
@click.option(
    "--baseline",
    required=True,
    type=click.Path(),
    help="Training data, the drift baseline: rows (.npz/.csv/.parquet), or for a tensor model an .npz of "
    "tensors or a folder of images, WAV files or .npy tensors (at most 5,000 read).",
)
@click.option(
    "--preprocess",
    type=click.Path(dir_okay=False),
    help="A tensor model's preprocessing (TOML), if 'edgekit convert' did not store one: the device decodes "
    "and prepares images or WAV files with it.",
)
@click.option(
    "--labels",
    "labels_path",
    type=click.Path(dir_okay=False),
    help="A tensor model's class names, one per line in output order.",
)
@click.option(
    "--key", "key_path", required=True, type=click.Path(dir_okay=False), help="Private key from 'edgekit keygen'."
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Bundle path (default: <name>-<version>.edgebundle)."
)
@click.option("--label", help="Label column of CSV baseline data, left out of the features.")
@click.option("--report", type=click.Path(dir_okay=False), help="A 'validate --json' report to record in the manifest.")
@click.option(
    "--eval",
    "eval_paths",
    multiple=True,
    type=click.Path(),
    help="Labelled held-out data (repeatable): calibrates the fleet's label-free accuracy estimate per window "
    "(the model's confidence mapped to its observed accuracy; a regressor's expected absolute error).",
)
@click.option(
    "--drift",
    "drift",
    multiple=True,
    metavar="NAME=VALUE",
    help="Override a drift threshold (alpha, min_psi, min_rows, consecutive_windows).",
)
@json_option
def package(
    model, name, version, baseline, key_path, output, label, report, eval_paths, drift, preprocess, labels_path, as_json
):
    """Package a converted model as a signed, versioned .edgebundle with its baseline profile.

    \b
    Examples:
      edgekit package model.int8.onnx --name digits --version 3 --baseline train.npz \\
          --eval test.npz --key keys/edgekit.key -o digits-3.edgebundle
      edgekit package cnn.int8.onnx --name cam --version 1 --baseline images/ --preprocess image.toml \\
          --labels labels.txt --key keys/edgekit.key -o cam-1.edgebundle
    """
    output = output or f"{name}-{version}.edgebundle"
    manifest = build_bundle(
        model,
        name=name,
        version=version,
        baseline_path=baseline,
        key_path=key_path,
        output=output,
        label=label,
        report_path=report,
        drift=_parse_drift(drift),
        preprocess=preprocess,
        labels=labels_path,
        eval_paths=eval_paths,
    )
    if as_json:
        emit_json({"output": output, "manifest": manifest})
    else:
        files = ", ".join(f"{k} ({v['size']:,} B)" for k, v in manifest["files"].items())
        click.echo(f"wrote {output}: {name} v{version}, {files}")


def _parse_drift(pairs: tuple[str, ...]) -> dict[str, float]:
    from device_agent.drift import DEFAULT_DRIFT_THRESHOLDS

    parsed = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in DEFAULT_DRIFT_THRESHOLDS:
            raise PackageError(f"unknown drift threshold {key!r}", f"use one of {', '.join(DEFAULT_DRIFT_THRESHOLDS)}")
        try:
            parsed[key] = float(value)
        except ValueError:
            raise PackageError(
                f"drift threshold {pair!r} has no number", "write it as NAME=VALUE, e.g. psi=0.25"
            ) from None
    return parsed


@click.command()
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option("--pubkey", type=click.Path(dir_okay=False), help="Also verify the signature with this public key.")
@json_option
def inspect(bundle, pubkey, as_json):
    """Show what a bundle holds. Every member's hash is checked; the signature too with --pubkey.

    \b
    Example:
      edgekit inspect digits-3.edgebundle --pubkey keys/edgekit.pub
    """
    opened = read_bundle(bundle, load_public_key(pubkey) if pubkey else None)
    if as_json:
        emit_json({"path": bundle, "signature": _signature_state(opened), "manifest": opened.manifest})
        return
    m = opened.manifest
    schema, output = m["input"], m["output"]
    lines = [
        f"bundle     {bundle}",
        f"model      {m['name']} v{m['version']}  ({_runtime_text(m['runtime'])})",
        f"created    {m['created']}",
        f"signature  {_signature_state(opened)}",
        f"input      {_input_text(schema)}",
        f"output     {output['task']}"
        + (
            f", labels {output['labels'][:10]}{' …' if len(output['labels']) > 10 else ''}"
            if output["task"] == "classification"
            else ""
        ),
        f"quantized  {_quantization_text(m.get('quantization'))}",
        f"validation {_validation_text(m.get('validation'))}",
        "drift      " + ", ".join(f"{k}={v}" for k, v in m["drift"].items()),
        f"lineage    commit {(m['lineage'].get('git_commit') or 'none')[:12]}"
        f"{' (dirty)' if m['lineage'].get('git_dirty') else ''}, "
        f"baseline sha256 {m['lineage']['baseline_sha256'][:12]}…, from {m['lineage'].get('model_source')}",
        "files      " + ", ".join(f"{k} {v['size']:,} B sha256 {v['sha256'][:12]}…" for k, v in m["files"].items()),
    ]
    click.echo("\n".join(lines))


def _runtime_text(runtime) -> str:
    if runtime.get("format") == "onnx":
        return (
            f"onnx, onnxruntime >= {runtime['min_runtime_version']}, IR {runtime['ir_version']}, opsets "
            f"{', '.join(f'{domain} {version}' for domain, version in sorted(runtime['opsets'].items()))}"
        )
    return f"{runtime.get('format')}, {runtime.get('engine')}"


def _signature_state(opened) -> str:
    return f"verified (key {opened.signed_by})" if opened.signed_by else "not checked (give --pubkey)"


def _quantization_text(quantization) -> str:
    if not quantization or quantization.get("mode") == "none":
        return "no (float32)"
    return quantization.get("label") or f"{quantization.get('mode')} {quantization.get('format', '')}".strip()


def _validation_text(validation) -> str:
    """The recorded verdict, each number with its meaning: a regressor's drop is RMSE, and the size ratio
    is against the validation's reference file (often a pickle), not float32 ONNX."""
    if not validation:
        return "none recorded (package with --report)"
    drop, metric = validation.get("accuracy_drop"), validation.get("metric") or "accuracy"
    parts = [f"{'passed' if validation.get('passed') else 'FAILED'}: agreement {validation.get('agreement'):.4f}"]
    if metric != "accuracy":
        parts[0] += f" ({compare.AGREEMENT_MEANING['regression']})"
    if drop is not None:
        parts.append(compare.describe_drop(drop, metric))
    parts.append(
        f"size {validation.get('size_ratio'):.3f}x of {validation.get('size_ratio_of') or 'the validation reference'}"
    )
    return ", ".join(parts)


@click.command()
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option(
    "--pubkey",
    required=True,
    type=click.Path(dir_okay=False),
    help="The trusted public key (.pub from 'edgekit keygen').",
)
@json_option
def verify(bundle, pubkey, as_json):
    """Check a bundle's signature and every member's hash, as a device would before installing it.

    \b
    Example:
      edgekit verify digits-3.edgebundle --pubkey keys/edgekit.pub
    """
    opened = read_bundle(bundle, load_public_key(pubkey))
    opened.baseline()  # a baseline that does not parse would fail on the device; say so here
    if as_json:
        emit_json(
            {
                "path": bundle,
                "verified": True,
                "signed_by": opened.signed_by,
                "name": opened.name,
                "version": opened.version,
                "members": sorted(opened.members),
            }
        )
    else:
        click.echo(
            f"OK: {bundle} is {opened.name} v{opened.version}, signed by key {opened.signed_by}; "
            f"{len(opened.members)} members match their sha256"
        )


def _input_text(schema: dict) -> str:
    """One matrix (its dtype and first names), typed columns (each with its type and whether it may be
    missing), or a tensor (its shape, layout and preprocessing)."""
    if schema.get("layout") == "tensor":
        from device_agent.tensors import TensorSpec

        spec = TensorSpec.from_dict(schema["tensor"])
        preprocess = schema.get("preprocess")
        steps = f"; preprocessing: {next(iter(preprocess))}" if preprocess else "; no preprocessing (send tensors)"
        return f"{spec.kind} tensor {spec.describe()}{steps}"
    if schema.get("layout") == "columns":
        shown = [
            f"{c['name']} ({c['dtype']}{', categorical' if c['kind'] == 'categorical' else ''}"
            f"{', may be missing' if c['nullable'] else ''}{', unused' if c.get('feed') is None else ''})"
            for c in schema["columns"][:8]
        ]
        more = f", … {len(schema['columns']) - 8} more" if len(schema["columns"]) > 8 else ""
        return f"{len(schema['columns'])} typed columns: {', '.join(shown)}{more}"
    names = schema["feature_names"]
    nan = "allowed" if schema["allow_nan"] else "refused"
    return (
        f"{schema['input_name']}: {schema['dtype']} [{len(names)} features: "
        f"{', '.join(names[:6])}{', …' if len(names) > 6 else ''}]  NaN {nan}"
    )
