"""LiteRT behind the agent's threaded HTTP server: concurrent requests get their own answers, never an error.

An interpreter is one set of tensors and LiteRT lets go of the GIL while it invokes, so before each
interpreter had its lock two requests could overwrite each other's input (a wrong answer) or fail on
"at least 1 reference to internal data", which the agent counts as the model failing (and an update's
health watch as a reason to roll back)."""

import threading

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from device_agent.runtimes.litert import LiteRtRuntime  # noqa: E402

THREADS, ROUNDS = 4, 150


@pytest.fixture(scope="module")
def digits_tflite(digits_onnx, tmp_path_factory):
    from edgekit.build.convert import convert_model

    path = tmp_path_factory.mktemp("litert_threads") / "digits.tflite"
    convert_model(str(digits_onnx), str(path), target_format="tflite")
    return path


def test_concurrent_predictions_on_one_interpreter_answer_each_its_own_rows(digits_tflite, digits):
    runtime = LiteRtRuntime()
    runtime.load(digits_tflite.read_bytes())
    X = np.load(digits.test)["X"].astype(np.float32)
    batches = [X[i * 16 : (i + 1) * 16] for i in range(THREADS * 2)]  # one size: one interpreter for all
    expected = [runtime.predict(batch) for batch in batches]
    assert len({tuple(e["label"]) for e in expected}) == len(batches)  # each batch's answer is its own
    wrong, failed = [], []

    def client(k: int) -> None:
        mine = (k, k + THREADS)
        for round_ in range(ROUNDS):
            i = mine[round_ % 2]
            try:
                answer = runtime.predict(batches[i])
            except Exception as exc:  # a failure is a finding, not a crash of the test's thread
                failed.append(repr(exc))
                continue
            if any(not np.array_equal(answer[name], expected[i][name]) for name in expected[i]):
                wrong.append(i)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failed and not wrong, f"{len(failed)} failed ({failed[:1]}), {len(wrong)} wrong of {THREADS * ROUNDS}"


def test_interpreters_for_new_sizes_made_at_once_by_several_threads_are_all_usable(digits_tflite, digits):
    runtime = LiteRtRuntime()
    runtime.load(digits_tflite.read_bytes())
    X = np.load(digits.test)["X"].astype(np.float32)
    sizes = [1, 2, 3, 5, 7, 9]  # more than the cache keeps: sizes are evicted while others are in use
    expected = {n: runtime.predict(X[:n])["label"] for n in sizes}
    errors = []

    def client(k: int) -> None:
        for round_ in range(40):
            n = sizes[(k + round_) % len(sizes)]
            try:
                got = runtime.predict(X[:n])["label"]
                assert np.array_equal(got, expected[n])
            except Exception as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:2]
