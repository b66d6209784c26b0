import pytest

from edgekit.errors import EdgekitError
from edgekit.local.emulate import DriftSpec
from tests.mqtt_helpers import Collector


def test_drift_spec_parsing():
    spec = DriftSpec.parse("feature=f20,shift=8,after=500,devices=0-2")
    assert (spec.feature, spec.shift, spec.after, spec.devices) == ("f20", 8.0, 500, frozenset({0, 1, 2}))
    with pytest.raises(EdgekitError, match="is not understood"):
        DriftSpec.parse("shift=8")


@pytest.mark.network
def test_emulated_fleet_reports_and_only_drifted_devices_are_flagged(
    cli, bundle, keypair, digits, broker, fleet_name, tmp_path
):
    collector = Collector(broker.url, fleet_name)
    result = _emulate(
        cli,
        bundle,
        keypair,
        digits,
        tmp_path,
        "--devices",
        "2",
        "--broker",
        broker.url,
        "--fleet",
        fleet_name,
        "--window-rows",
        "300",
        "--rows-per-second",
        "1500",
        "--drift",
        "feature=f20,shift=8,after=0,devices=0",
        "--duration",
        "4",
    )
    assert result.exit_code == 0, result.output
    assert "stopped 2 emulated device(s)" in result.stdout
    collector.wait(
        lambda: len(collector.of("emu-00")) >= 3 and len(collector.of("emu-01")) >= 3,
        what="summaries from both devices",
    )
    drifted = collector.of("emu-00")
    clean = collector.of("emu-01")
    assert all(s["drift"]["features"]["pixel_2_4"].get("drifted") for s in drifted if s["rows"] >= 300)
    assert sum(bool(s["drift"]["drifted"]) for s in clean if s["rows"] >= 300) <= 1
    assert collector.states["emu-00"]["online"] is False  # stopped cleanly: the retained state says so
    collector.close()


def test_unknown_drift_feature_is_one_line(cli, bundle, keypair, digits, tmp_path):
    result = _emulate(
        cli, bundle, keypair, digits, tmp_path, "--devices", "1", "--drift", "feature=nope,shift=1", "--duration", "1"
    )
    assert result.exit_code == 2 and "the model has no feature 'nope'" in result.stderr


def test_feedback_and_capture_options_reach_each_device(cli, bundle, keypair, digits, tmp_path):
    """``--feedback`` and ``--capture-rate`` end in every device's agent.toml, which the agent reads back."""
    from device_agent.config import load_config

    result = _emulate(
        cli,
        bundle,
        keypair,
        digits,
        tmp_path,
        "--devices",
        "2",
        "--feedback",
        "0.5",
        "--capture-rate",
        "0.25",
        "--duration",
        "0.5",
    )
    assert result.exit_code == 0, result.stderr
    for index in range(2):
        config = load_config(tmp_path / "fleet" / f"emu-{index:02d}" / "agent.toml")
        assert config.emulate.feedback == 0.5
        assert config.capture.enabled and config.capture.rate == 0.25


def _emulate(cli, bundle, keypair, digits, tmp_path, *options):
    """``edgekit emulate`` on the digits bundle and test data, its devices under ``tmp_path/fleet``."""
    common = ["--bundle", bundle, "--pubkey", keypair[1], "--data", digits.test, "--state-dir", tmp_path / "fleet"]
    return cli("emulate", *common, *options)
