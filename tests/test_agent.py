"""The device agent without a broker: Python API, HTTP API, install, batch scoring, windows."""

import json
import logging
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from device_agent import Agent
from device_agent.cli import main as agent_main
from device_agent.errors import ConfigError, InputError, InstallError
from device_agent.protocol import SUMMARY_SCHEMA
from tests.agent_helpers import config_of, make_device


@pytest.fixture
def device(tmp_path, bundle, keypair):
    return make_device(tmp_path / "dev", bundle, keypair[1], window_rows=100)


def http(agent, method, path, body=None, token=None):
    host, port = agent.server.server_address[:2]
    request = urllib.request.Request(
        f"http://{host}:{port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_python_api_predicts_and_closes_windows_of_exact_size(device, digits):
    X = np.load(digits.test)["X"]
    with Agent(config_of(device)).start(http=False) as agent:
        result = agent.predict(X[:250])
        assert len(result.ids) == 250 and len(set(result.ids)) == 250
        assert result.to_json()["model_version"] == 3 and len(result.to_json()["probabilities"][0]) == 10
        agent.monitor.process()
        assert agent.stats["windows"] == 2 and agent.last_summary["rows"] == 100
        first = agent.spool.seq_base()  # a fresh spool numbers from the clock (ms): test_seq_reinstall.py
        assert agent.last_summary["schema"] == SUMMARY_SCHEMA and agent.last_summary["seq"] == first + 1
        assert agent.last_summary["seq_base"] == first and first > 1.6e12
        assert agent.spool.pending() == [first, first + 1]  # no broker configured: they wait in the spool


def test_bad_rows_are_refused_and_counted_while_good_rows_are_served(device, digits):
    X = np.load(digits.test)["X"]
    with Agent(config_of(device)).start() as agent:
        for bad, message in [
            ([[1, 2, 3]], "has 3 columns, the model takes 64"),
            ([["x"] * 64], "is not numeric"),
            ([[float("nan")] * 64], "missing value"),
            ("oops", "not numeric"),
        ]:
            status, body = http(agent, "POST", "/v1/models/digits:predict", {"instances": bad})
            assert status == 400 and message in json.loads(body)["error"], body
            status, body = http(agent, "POST", "/v1/models/digits:predict", {"instances": X[:2].tolist()})
            assert status == 200 and len(json.loads(body)["predictions"]) == 2
        assert http(agent, "POST", "/v1/models/other:predict", {"instances": [[0] * 64]})[0] == 404
        assert http(agent, "GET", "/v1/models/digits:predict")[0] == 405
        assert http(agent, "POST", "/v1/models/digits:predict", None)[0] == 400
        agent.monitor.flush()
        assert agent.last_summary["errors"] == {"bad_input": 4}
        assert agent.last_summary["quality"]["nulls"] == 0  # refused rows never reach the sketches


def test_status_health_metrics_and_feedback(device, digits):
    X, y = np.load(digits.test)["X"], np.load(digits.test)["y"]
    with Agent(config_of(device)).start() as agent:
        status, body = http(agent, "POST", "/v1/models/digits:predict", {"instances": X[:100].tolist()})
        answer = json.loads(body)
        agent.monitor.process()  # window 1 closes; feedback below counts in the window open when it arrives
        feedback = [{"id": i, "label": int(label)} for i, label in zip(answer["ids"], y[:100], strict=True)]
        status, body = http(
            agent, "POST", "/v1/models/digits:feedback", {"feedback": feedback + [{"id": "nope-1", "label": 0}]}
        )
        assert status == 200 and json.loads(body) == {"accepted": 100, "unknown": ["nope-1"], "duplicate": []}
        again = json.loads(
            http(agent, "POST", "/v1/models/digits:feedback", {"id": answer["ids"][0], "label": int(y[0])})[1]
        )
        assert again["accepted"] == 0 and again["duplicate"] == [answer["ids"][0]]  # counted once
        status, body = http(agent, "POST", "/v1/models/digits:feedback", {"id": answer["ids"][1], "label": "cat"})
        assert status == 400 and "not one of the model's classes" in json.loads(body)["error"]
        agent.monitor.process()
        time.sleep(0.05)
        http(agent, "POST", "/v1/models/digits:predict", {"instances": X[100:200].tolist()})
        agent.monitor.process()
        accuracy = agent.last_summary["accuracy"]
        assert accuracy["labelled"] == 100 and accuracy["accuracy"] > 0.9
        assert json.loads(http(agent, "GET", "/healthz")[1])["status"] == "ok"
        model = json.loads(http(agent, "GET", "/v1/models/digits")[1])
        assert model["version"] == 3 and model["state"] == "AVAILABLE"
        metrics = http(agent, "GET", "/metrics")[1].decode()
        assert 'edgekit_predictions_total{model="digits",version="3"} 200' in metrics
        assert (
            "edgekit_latency_seconds_bucket" in metrics
            and "edgekit_drift_psi" in metrics
            and "edgekit_spool_depth" in metrics
        )


def test_bearer_token(tmp_path, bundle, keypair):
    config = make_device(tmp_path / "dev", bundle, keypair[1], token="s3cret")
    with Agent(config_of(config)).start() as agent:
        assert http(agent, "GET", "/healthz")[0] == 200
        assert http(agent, "GET", "/v1/models/digits")[0] == 401
        assert http(agent, "GET", "/v1/models/digits", token="wrong")[0] == 401
        assert http(agent, "GET", "/v1/models/digits", token="s3cret")[0] == 200


def test_summary_size_per_feature(device, digits):
    X = np.load(digits.test)["X"]
    with Agent(config_of(device)).start(http=False) as agent:
        agent.predict(X[:100])
        agent.monitor.process()
        size = len(json.dumps(agent.last_summary, separators=(",", ":")))
        assert size / 64 <= 128, size


def test_install_refuses_downgrades_and_unsigned_changes(tmp_path, bundle, keypair, digits, digits_int8, cli):
    config = make_device(tmp_path / "dev", bundle, keypair[1])
    assert agent_main(["install", str(bundle), "--config", str(config)]) == 2  # same version again
    older = tmp_path / "digits-2.edgebundle"
    assert (
        cli(
            "package",
            digits_int8,
            "--name",
            "digits",
            "--version",
            "2",
            "--baseline",
            digits.train,
            "--key",
            keypair[0],
            "-o",
            older,
        ).exit_code
        == 0
    )
    with pytest.raises(InstallError, match="version 2 of 'digits' is not newer than the installed version 3"):
        from device_agent.signing import load_public_key
        from device_agent.state import StateDir

        StateDir(tmp_path / "dev" / "state").install(older, load_public_key(keypair[1]))
    newer = tmp_path / "digits-4.edgebundle"
    cli(
        "package",
        digits_int8,
        "--name",
        "digits",
        "--version",
        "4",
        "--baseline",
        digits.train,
        "--key",
        keypair[0],
        "-o",
        newer,
    )
    assert agent_main(["install", str(newer), "--config", str(config)]) == 0
    state = json.loads((tmp_path / "dev" / "state" / "state.json").read_text())
    assert state["version"] == 4 and state["previous_version"] == 3 and state["active"] == "b"


def test_batch_scoring_cli(tmp_path, device, digits, capsys):
    assert agent_main(["predict", "--config", str(device), str(digits.test_csv)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("prediction,p_0,p_1") and len(lines) == 1 + len(np.load(digits.test)["y"])
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert agent_main(["predict", "--config", str(device), str(bad)]) == 2
    assert "lacks the model's columns 'pixel_0_0'" in capsys.readouterr().err  # matched by name, as on the host


def test_config_errors_are_one_line(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "bad id"\nstate_dir = "s"\n[trust]\npublic_key = "k"\n')
    with pytest.raises(ConfigError, match="device_id 'bad id' is not allowed"):
        config_of(path)
    path.write_text("device_id = [")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        config_of(path)
    assert agent_main(["run", "--config", str(tmp_path / "missing.toml")]) == 2


def test_agent_without_a_model_says_how_to_install_one(tmp_path, keypair):
    path = tmp_path / "agent.toml"
    path.write_text(f'device_id = "d"\nstate_dir = "{tmp_path / "s"}"\n[trust]\npublic_key = "{keypair[1]}"\n')
    with pytest.raises(InstallError, match="no model is installed; install one with 'edge-agent install"):
        Agent(config_of(path)).start(http=False)


def test_input_error_is_raised_through_the_python_api(device):
    with Agent(config_of(device)).start(http=False) as agent:
        with pytest.raises(InputError):
            agent.predict([[1, 2]])


def test_spool_numbers_never_skip_or_repeat_across_crashes(tmp_path):
    from device_agent.spool import Spool

    spool = Spool(tmp_path / "spool")
    first = spool.next_seq()  # a fresh spool's base (test_seq_reinstall.py)
    spool.put(first, b"{}")
    assert spool.next_seq() == first + 1
    seq = spool.next_seq()  # a crash here, before put: nothing was published under it
    assert Spool(tmp_path / "spool").next_seq() == seq == first + 1
    (tmp_path / "spool" / "pending" / f"{first + 1:012d}.json").write_bytes(
        b"{}"
    )  # a crash after the write, before the counter moved
    assert Spool(tmp_path / "spool").next_seq() == first + 2
    spool.ack(first)
    spool.prune(now=10**12)  # acknowledged ones pruned: the counter still remembers
    assert Spool(tmp_path / "spool").next_seq() == first + 2


def test_windows_too_small_for_a_drift_verdict_are_named_at_start(tmp_path, bundle, keypair, caplog):
    caplog.set_level(logging.WARNING, logger="device_agent")
    Agent(config_of(make_device(tmp_path / "small", bundle, keypair[1], window_rows=50, http=False))).start(
        http=False
    ).stop()
    warnings = [r.getMessage() for r in caplog.records if r.name == "device_agent" and "min_rows" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert (
        "window_rows = 50 is below the drift test's min_rows = 100" in warnings[0]
        and "set window_rows = 100 or more" in warnings[0]
    )
    caplog.clear()
    Agent(config_of(make_device(tmp_path / "enough", bundle, keypair[1], window_rows=100, http=False))).start(
        http=False
    ).stop()
    assert not [r for r in caplog.records if "min_rows" in r.getMessage()]


def test_http_rows_as_objects_by_name_and_wording_of_bad_rows(device, digits):
    data = np.load(digits.test)
    X = data["X"][:2]
    with Agent(config_of(device)).start() as agent:
        names = agent.schema.feature_names
        objects = [
            dict(reversed(list(zip(names, row.tolist(), strict=True)))) for row in X
        ]  # keys in reverse order: put in schema order
        status, body = http(agent, "POST", "/v1/models/digits:predict", {"instances": objects})
        expected = json.loads(http(agent, "POST", "/v1/models/digits:predict", {"instances": X.tolist()})[1])
        assert status == 200 and json.loads(body)["predictions"] == expected["predictions"]
        for bad, message in [
            (
                [X[0].tolist(), X[1].tolist()[:63]],
                "request row 1 has 63 values, the model takes 64; send every row as a list of 64 numbers",
            ),
            (
                [["3.5", *X[0].tolist()[1:]]],
                "request row 0 column 'pixel_0_0' holds the string '3.5', which is not numeric",
            ),
            ([{**objects[0], "label": 3}], "request row 0 has keys the model does not know: 'label'"),
        ]:
            status, body = http(agent, "POST", "/v1/models/digits:predict", {"instances": bad})
            assert status == 400 and message in json.loads(body)["error"], body


def test_with_an_agent_already_started_does_not_start_it_again(tmp_path, bundle, keypair):
    agent = Agent(config_of(make_device(tmp_path / "dev", bundle, keypair[1], http=False))).start(mqtt=False)
    first = agent._thread
    with agent as entered:
        assert entered._thread is first  # not a second background thread
    assert not first.is_alive()


def test_a_bad_broker_url_in_agent_toml_names_the_rule_both_sides_share(tmp_path, bundle, keypair):
    config = make_device(tmp_path / "dev", bundle, keypair[1], broker="tcp://broker:1883", http=False)
    with pytest.raises(ConfigError, match=r"\[mqtt\] url: broker URL 'tcp://broker:1883' is not mqtt://host\[:port\]"):
        config_of(config)
