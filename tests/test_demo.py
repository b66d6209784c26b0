import pytest


def test_demo_host_pipeline_only(cli, tmp_path):
    result = cli("demo", "--workdir", tmp_path / "demo", "--fixtures", tmp_path / "none", "--devices", "0")
    assert result.exit_code == 0, result.output
    assert "[4/8] packaged and signed digits v1" in result.stdout
    assert (tmp_path / "demo" / "digits-1.edgebundle").exists() and (tmp_path / "demo" / "digits-2.edgebundle").exists()


@pytest.mark.network
@pytest.mark.parametrize("broker", ["auto", "amqtt"])
def test_demo_runs_the_whole_loop_and_flags_the_drifted_device(cli, digits, tmp_path, broker):
    result = cli(
        "demo",
        "--workdir",
        tmp_path / "demo",
        "--fixtures",
        digits.model.parent,
        "--devices",
        "2",
        "--duration",
        "12",
        "--broker",
        broker,
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "[8/8] final fleet status" in out
    final = out.split("[8/8] final fleet status:")[1]
    emu0 = next(line for line in final.splitlines() if line.startswith("emu-00"))
    assert any(line.startswith("emu-01") for line in final.splitlines())
    assert "DRIFTED" in emu0 and "pixel_2_4" in emu0
    alerts = final.split("open alerts:")[1].splitlines()[0]
    assert (
        "drift emu-00 pixel_2_4" in alerts and "emu-01" not in alerts
    )  # a single clean window may flag by chance; an alert needs two
    assert ("amqtt" in out) == (broker == "amqtt")
    assert "[7/8] rolling out digits v2" in out
    assert "succeeded (2 of 2 device(s) updated)" in final
    assert "digits v2" in emu0


def test_the_look_again_hint_runs_from_a_fresh_shell(monkeypatch, tmp_path):
    """scripts/demo.sh puts .venv/bin on its own PATH only: the hint must not rely on that PATH."""
    import sys
    from pathlib import Path

    from edgekit.cli.demo import _edgekit_command

    if sys.prefix == sys.base_prefix:
        pytest.fail("the tests run from scripts/test.sh's .venv")
    beside = str(Path(sys.executable).parent / "edgekit")
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + ":/usr/bin:/bin")  # as demo.sh runs it
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    assert _edgekit_command() == beside
    monkeypatch.setenv("VIRTUAL_ENV", sys.prefix)  # an activated venv: its shells have edgekit on PATH
    assert _edgekit_command() == "edgekit"
