import pytest


def test_demo_host_pipeline_only(cli, tmp_path):
    result = cli("demo", "--workdir", tmp_path / "demo", "--fixtures", tmp_path / "none", "--devices", "0")
    assert result.exit_code == 0, result.output
    assert "[4/8] packaged and signed digits v1" in result.stdout
    assert (tmp_path / "demo" / "digits-1.edgebundle").exists() and (tmp_path / "demo" / "digits-2.edgebundle").exists()


@pytest.mark.network
@pytest.mark.parametrize("broker", ["auto", "amqtt"])
def test_demo_runs_the_whole_loop_and_closes_the_drift_alert(cli, digits, tmp_path, broker):
    """v2 in two waves with shadow, then the loop: emu-00 drifts, its alert has the retrain sink fetch its labelled
    field samples, retrain, promote and roll v3 out to it; the alert closes. Checked in the fleet store the demo
    leaves behind, not only in what it prints."""
    from edgekit.fleet.store import SqliteStore

    workdir = tmp_path / "demo"
    result = cli(
        "demo",
        "--workdir",
        workdir,
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
    final = out.split("[8/8] final fleet status:")[1]
    rows = {line.split()[0]: line for line in final.splitlines() if line.startswith(("emu-", "tab-", "cam-"))}
    assert "digits v3" in rows["emu-00"] and "digits v2" in rows["emu-01"], final
    assert "DRIFTED" in rows["tab-00"] and "country" in rows["tab-00"]
    open_alerts = final.split("open alerts:")[1].splitlines()[0]
    assert "drift tab-00 country" in open_alerts and "drift emu-00" not in open_alerts and "emu-01" not in open_alerts
    assert ("amqtt" in out) == (broker == "amqtt")
    assert "[7/8] rolling out digits v2" in out and "succeeded (2 of 2 device(s) updated)" in final

    store = SqliteStore(workdir / "fleet.db")
    try:
        (alert,) = [
            a for a in store.alerts() if (a["rule"], a["device"], a["subject"]) == ("drift", "emu-00", "pixel_0_1")
        ]
        assert alert["state"] == "closed", alert
        timeline = store.timeline(alert["id"])
        assert timeline["run"]["state"] == "succeeded", timeline
        steps = {step["step"]: step for step in timeline["steps"]}
        assert [s["step"] for s in timeline["steps"]][-3:] == ["promote", "bundle stored", "rollout started"]
        assert steps["samples exported"]["detail"]["rows"] > 50  # labelled by the emulated app's feedback
        assert steps["baseline"]["detail"]["rows"] >= 200 and steps["command finished"]["detail"]["exit_code"] == 0
        assert steps["promote"]["detail"]["promoted"] and steps["promote"]["detail"]["fresh"]["gain"] > 0
        rollout, devices = store.rollout(steps["rollout started"]["detail"]["rollout"])
        assert (rollout["state"], rollout["version"]) == ("succeeded", 3)
        assert [d["device"] for d in devices] == ["emu-00"]  # only the drifted device: the others see no change
        assert alert["closed_at"] > steps["rollout started"]["at"]  # closed by v3's baseline, not before it
        versions = {d["device"]: d["model_version"] for d in store.status()}
        assert (versions["emu-00"], versions["emu-01"]) == (3, 2)
    finally:
        store.close()
    printed = out.split("the loop, as the fleet store recorded it for alert")[1]
    assert f"alerts/{alert['id']}/timeline" in printed and "alert closed" in printed and "promote" in printed


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
