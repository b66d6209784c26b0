"""``edgekit demo``: the whole loop on one machine, on models made from scikit-learn's datasets.

Today the loop is the host pipeline: train (from the shipped digits dataset), convert, quantize
with the accuracy- and speed-aware search, validate against the scikit-learn model, make a key,
package a signed bundle, and verify it as a device would. Each step is the library call the
matching CLI command makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

from device_agent.bundle import read_bundle
from device_agent.signing import load_public_key

from .fixtures import fixtures_usable, make_fixtures
from .keys import generate_keypair
from .package import build_bundle
from .pipeline import QuantizeOptions, convert_model
from .validate import Thresholds, validate

Say = Callable[[str], None]


@dataclass(frozen=True)
class DemoResult:
    workdir: Path
    bundle: Path
    validation_passed: bool


def run_demo(workdir: str | Path, *, fixtures: str | Path | None = None, say: Say = print) -> DemoResult:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(fixtures) if fixtures and fixtures_usable(fixtures, ("digits",)) else workdir / "fixtures"
    if data_dir == workdir / "fixtures":
        say(f"[1/6] training the digits model (StandardScaler + MLP) from scikit-learn's bundled dataset -> {data_dir}")
        make_fixtures(data_dir, ("digits",))
    else:
        say(f"[1/6] using the digits fixtures in {data_dir}")
    model, train, test = data_dir / "digits.joblib", data_dir / "digits_train.npz", data_dir / "digits_test.npz"
    fp32, int8 = workdir / "digits.onnx", workdir / "digits.int8.onnx"
    convert_model(str(model), str(fp32))
    say(f"[2/6] converted {model.name} -> {fp32} ({fp32.stat().st_size:,} bytes, float32)")
    outcome = convert_model(str(model), str(int8), quantize=QuantizeOptions(max_accuracy_drop=0.01), calibration=str(train), evaluation=str(test))
    say(f"[3/6] quantization search: {outcome.search.verdict}")
    report = validate(str(int8), reference_path=str(model), data_path=str(test), thresholds=Thresholds(max_accuracy_drop=0.01, min_agreement=0.99))
    report_path = workdir / "validation.json"
    import json

    report_path.write_text(json.dumps(report, indent=1, default=str))
    say(
        f"[4/6] validated {int8.name} against scikit-learn on {report['rows']} held-out rows: accuracy {report['reference']['metric']:.4f} -> "
        f"{report['candidate']['metric']:.4f}, agreement {report['agreement']:.4f}, size ratio {report['size_ratio']:.3f}, "
        f"{'PASSED' if report['passed'] else 'FAILED'}"
    )
    private, public, key_id = generate_keypair(workdir / "keys", force=True)
    bundle = workdir / "digits-1.edgebundle"
    build_bundle(str(int8), name="digits", version=1, baseline_path=str(train), key_path=str(private), output=str(bundle), report_path=str(report_path))
    say(f"[5/6] packaged {bundle} ({bundle.stat().st_size:,} bytes), signed with key {key_id}")
    opened = read_bundle(bundle, load_public_key(public))
    say(f"[6/6] verified {bundle.name} as a device would: signature by {opened.signed_by}, {len(opened.members)} members match their sha256, baseline of {opened.baseline().rows} rows")
    return DemoResult(workdir, bundle, bool(report["passed"]))
