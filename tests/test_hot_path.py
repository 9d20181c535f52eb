"""The serving hot path: ``Artifact.runner()`` and the fast checks ``Artifact.run`` shares.

A bound runner must give what ``Artifact.run`` and onnxruntime give (fixed shapes and a
dynamic batch), refuse what ``Artifact.run`` refuses with the same message, fill ``out``
arrays, never hand back memory a later call writes, and refuse a second thread instead of
computing wrong numbers.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

import graphopt
from graphopt.errors import ArtifactError, InputError
from graphopt.targets import _runner
from graphopt.verify import compare, onnxruntime_reference
from tests.conftest import make_model
from tests.test_dynamic_batch import relu_model, with_batch


def conv_model():
    """x(1,2,6,6) -> Conv 3x3 (pad 1) -> y, and Sigmoid(y) -> s: two outputs."""
    w = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)
    return make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["y"], ["s"]),
        ],
        {"x": (1, 2, 6, 6)},
        {"y": (1, 3, 6, 6), "s": (1, 3, 6, 6)},
        {"w": w},
    )


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    model = conv_model()
    path = tmp_path_factory.mktemp("hot") / "conv.so"
    return model, graphopt.compile(model, "x86", path)


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    """Relu(x + y), x and y of shape (N, 3): two inputs sharing the batch symbol."""
    model = with_batch(relu_model(x=(1, 3), y=(1, 3)))
    path = tmp_path_factory.mktemp("hot") / "dyn.so"
    return model, graphopt.compile(model, "x86", path, dynamic_batch=True)


def test_runner_matches_run_and_onnxruntime(conv):
    model, art = conv
    reference = onnxruntime_reference(model)
    runner = art.runner()
    assert runner.input_names == ("x",) and runner.output_names == ("y", "s")
    for seed in range(3):
        inputs = art.random_inputs(seed=seed)
        expected = art.run(inputs)
        got = runner(inputs["x"])
        assert [g.shape for g in got] == [(1, 3, 6, 6)] * 2
        for name, value in zip(runner.output_names, got, strict=True):
            np.testing.assert_array_equal(value, expected[name])
        by_name = runner.run(inputs)
        assert by_name.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(by_name[name], expected[name])
        report = compare(by_name, reference(inputs), rtol=1e-4, atol=1e-5)
        assert report["ok"], report["first_mismatch"]
        strided = np.asfortranarray(inputs["x"])  # copied in through the view all the same
        np.testing.assert_array_equal(runner(strided)[0], expected["y"])


def test_dynamic_batch_rebinds_on_a_new_size(dynamic):
    model, art = dynamic
    reference = onnxruntime_reference(model)
    runner = art.runner(batch=2)
    for batch in (2, 1, 5, 2):
        inputs = art.random_inputs(seed=batch, batch=batch)
        got = runner.run(inputs)
        assert got["z"].shape == (batch, 3)
        np.testing.assert_array_equal(got["z"], art.run(inputs)["z"])
        np.testing.assert_allclose(got["z"], reference(inputs)["z"], rtol=1e-6, atol=1e-6)
    # the symbol binds once per call, through the fast path too
    f = np.float32
    with pytest.raises(InputError, match="dim N is 4 in another input, here 2"):
        runner(np.zeros((4, 3), f), np.zeros((2, 3), f))


def _message(call, *args) -> str:  # noqa: ANN001
    with pytest.raises(InputError) as info:
        call(*args)
    return str(info.value)


def test_bad_inputs_give_the_same_error_as_run(conv, dynamic):
    for _, art in (conv, dynamic):
        runner = art.runner()
        good = art.random_inputs()
        first = runner.input_names[0]
        x = good[first]
        bad = [
            {},  # missing
            {**good, "extra": x},  # unknown
            {**good, first: x[..., :-1]},  # shape
            {**good, first: x.astype(np.float64)},  # dtype
            {**good, first: x.tolist()},  # a list: float64 once an array
        ]
        for inputs in bad:
            expected = _message(art.run, inputs)
            assert _message(runner.run, inputs) == expected
            if inputs and "extra" not in inputs:
                assert _message(runner, *inputs.values()) == expected
        assert "the model takes" in _message(runner, *good.values(), x)
        runner.run(good)  # still runs after the refusals


def test_out_arrays_are_filled(conv):
    _, art = conv
    runner = art.runner()
    inputs = art.random_inputs(seed=1)
    expected = art.run(inputs)
    out = [np.full((1, 3, 6, 6), np.nan, np.float32) for _ in range(2)]
    got = runner(inputs["x"], out=out)
    assert got[0] is out[0] and got[1] is out[1]
    np.testing.assert_array_equal(out[0], expected["y"])
    np.testing.assert_array_equal(out[1], expected["s"])
    named = {"y": np.empty((1, 3, 6, 6), np.float32), "s": np.empty((1, 3, 6, 6), np.float32)}
    assert runner.run(inputs, out=named)["s"] is named["s"]
    np.testing.assert_array_equal(named["s"], expected["s"])
    # no broadcasting, no casting, every output named
    wrong = [out[0], np.empty((3, 6, 6), np.float32)]
    with pytest.raises(InputError, match=r"out array for output 's'.*\(1, 3, 6, 6\) float32"):
        runner(inputs["x"], out=wrong)
    with pytest.raises(InputError, match="out array for output 'y'"):
        runner(inputs["x"], out=[out[0].astype(np.float64), out[1]])
    with pytest.raises(InputError, match="every output"):
        runner.run(inputs, out={"y": out[0]})
    np.testing.assert_array_equal(runner(inputs["x"])[1], expected["s"])


def test_results_are_not_aliased_between_calls(conv):
    _, art = conv
    runner = art.runner()
    a, b = art.random_inputs(seed=1), art.random_inputs(seed=2)
    a_copy = a["x"].copy()
    want_a, want_b = art.run(a), art.run(b)
    first, first_run = runner(a["x"]), art.run(a)
    second, second_run = runner(b["x"]), art.run(b)
    np.testing.assert_array_equal(first[0], want_a["y"])  # untouched by the second call
    np.testing.assert_array_equal(first_run["y"], want_a["y"])
    np.testing.assert_array_equal(second[0], want_b["y"])
    np.testing.assert_array_equal(second_run["y"], want_b["y"])
    np.testing.assert_array_equal(a["x"], a_copy)  # the call does not write its inputs
    first[0][...] = 0  # the caller's to change: the next call does not see it
    np.testing.assert_array_equal(runner(a["x"])[0], want_a["y"])
    a["x"][...] = 0  # nor does a result see a later change to its input
    np.testing.assert_array_equal(second[0], want_b["y"])


def _aligned(source: np.ndarray) -> np.ndarray:
    raw = np.empty(source.nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    arr = raw[start : start + source.nbytes].view(source.dtype).reshape(source.shape)
    arr[...] = source
    return arr


def test_large_aligned_inputs_are_lent_without_a_copy(conv, monkeypatch):
    _, art = conv
    lent = []
    real = _runner._lend

    def spy(a):  # noqa: ANN001, ANN202
        t = real(a)
        lent.append(t is not None)
        return t

    monkeypatch.setattr(_runner, "ZERO_COPY_BYTES", 0)  # every input counts as large
    monkeypatch.setattr(_runner, "_lend", spy)
    runner = art.runner()
    inputs = art.random_inputs(seed=4)
    expected = art.run({"x": inputs["x"].copy()})
    x = _aligned(inputs["x"])
    got = runner(x)
    assert lent[-1] is True  # aligned and contiguous: lent
    np.testing.assert_array_equal(got[0], expected["y"])
    x[...] = 0  # the output was copied out: the caller's input is theirs again
    np.testing.assert_array_equal(got[0], expected["y"])
    unaligned = np.empty(x.size + 1, np.float32)[1:].reshape(x.shape)
    unaligned[...] = inputs["x"]
    np.testing.assert_array_equal(runner(unaligned)[0], expected["y"])
    assert lent[-1] is False  # copied instead
    fortran = np.asfortranarray(inputs["x"])
    assert not fortran.flags.c_contiguous
    np.testing.assert_array_equal(runner(fortran)[0], expected["y"])
    assert lent[-1] is False


def test_one_runner_refuses_a_second_thread(conv):
    _, art = conv
    runner = art.runner()
    inputs = [art.random_inputs(seed=s) for s in range(2)]
    expected = [art.run(x)["y"] for x in inputs]
    seen = []

    def hammer(t: int, barrier: threading.Barrier) -> None:
        barrier.wait()
        for _ in range(300):
            try:
                ok = np.array_equal(runner(inputs[t]["x"])[0], expected[t])
                seen.append("ok" if ok else "wrong")
            except ArtifactError as exc:
                seen.append("refused" if "two threads" in str(exc) else repr(exc))

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=hammer, args=(t, barrier)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert set(seen) <= {"ok", "refused"} and "ok" in seen
    # deterministic: a call while another holds the runner is refused, not run
    with runner._busy, pytest.raises(ArtifactError, match="two threads"):
        runner(inputs[0]["x"])


def test_runners_per_thread_agree(dynamic):
    _, art = dynamic
    inputs = [art.random_inputs(seed=s, batch=s + 1) for s in range(3)]
    expected = [art.run(x)["z"] for x in inputs]
    wrong = []

    def serve(t: int) -> None:
        runner = art.runner()
        for i in range(200):
            k = (t + i) % 3
            if not np.array_equal(runner.run(inputs[k])["z"], expected[k]):
                wrong.append((t, i))

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert wrong == []


def test_a_closed_artifact_refuses_its_runners(dynamic):
    art = graphopt.load(dynamic[1].path)  # an Artifact of its own, to close
    runner = art.runner()
    inputs = art.random_inputs()
    runner.run(inputs)
    art.close()
    with pytest.raises(ArtifactError, match="closed"):
        runner.run(inputs)
    with pytest.raises(ArtifactError, match="closed"):
        art.runner()


def test_an_output_that_is_the_input_is_copied_out(tmp_path):
    # The VM returns the held input tensor itself for an Identity output: without the
    # copy out, the next call would overwrite the first call's result.
    model = make_model(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Relu", ["x"], ["r"])],
        {"x": (1, 4)},
        {"y": (1, 4), "r": (1, 4)},
    )
    art = graphopt.compile(model, "x86", tmp_path / "ident.so")
    runner = art.runner()
    a = np.arange(-2, 2, dtype=np.float32).reshape(1, 4)
    first, first_run = runner(a), art.run({"x": a})
    runner(a + 10)
    art.run({"x": a + 10})
    np.testing.assert_array_equal(first[0], a)
    np.testing.assert_array_equal(first[1], np.maximum(a, 0))
    np.testing.assert_array_equal(first_run["y"], a)


def test_the_serving_doc_runs_as_written(tmp_path, monkeypatch):
    doc = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
    blocks = re.findall(r"^```python\n(.*?)^```$", doc.read_text(), flags=re.M | re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "serving_doc"}
    for k, code in enumerate(blocks, start=1):
        exec(compile(code, f"{doc.name} block {k}", "exec"), namespace)  # noqa: S102
    assert namespace["o"].model == "mlp_head"


class _DoublingRunner:
    """Stands in for a runner without VMs (an ARM artifact under emulation)."""

    def run(self, arrays):  # noqa: ANN001, ANN201
        return [np.asarray(arrays[0]) * 2]


def test_a_runner_without_vms_is_called_through_its_run(conv, monkeypatch):
    art = graphopt.load(conv[1].path)
    monkeypatch.setattr(art, "_load", _DoublingRunner)
    runner = art.runner()
    x = art.random_inputs()["x"]
    np.testing.assert_array_equal(runner(x)[0], x * 2)
    out = np.empty(x.shape, np.float32)
    assert runner(x, out=[out])[0] is out
    np.testing.assert_array_equal(out, x * 2)
    with pytest.raises(InputError, match="dtype"):
        runner(x.astype(np.float64))


def test_the_path_for_other_devices_copies_through_tvm(conv):
    # A GPU's tensors have no numpy view: inputs go in by copyfrom, outputs come out by
    # .numpy(). Exercised here on the CPU by turning the views off.
    _, art = conv
    runner = graphopt.load(art.path).runner()
    bound = runner._bound
    bound._cpu = False
    bound.hold(((1, 2, 6, 6),), (np.dtype(np.float32),))
    assert bound._views == [None] and not bound._plain
    inputs = art.random_inputs(seed=5)
    expected = art.run(inputs)
    got = runner(np.asfortranarray(inputs["x"]))
    np.testing.assert_array_equal(got[0], expected["y"])
    out = [np.empty((1, 3, 6, 6), np.float32) for _ in range(2)]
    runner(inputs["x"], out=out)
    np.testing.assert_array_equal(out[1], expected["s"])


def test_a_batch_below_one_is_refused(dynamic):
    with pytest.raises(InputError, match="batch must be"):
        dynamic[1].runner(batch=0)


def test_load_run_and_runner_on_tvm_runtime_alone(conv):
    """A deployment host may have TVM's runtime without its compiler library: graphopt.load,
    run and runner() must not need anything TVM_USE_RUNTIME_LIB=1 leaves out."""
    _, artifact = conv
    import os
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, graphopt\n"
        f"a = graphopt.load({str(artifact.path)!r})\n"
        "i = a.random_inputs(seed=0)\n"
        "o = a.run(i)\n"
        "r = a.runner()\n"
        "y = r(*i.values())\n"
        "assert all(np.array_equal(x, o[n]) for n, x in zip(r.output_names, y))\n"
        "assert 'tvm.relax' not in sys.modules, 'the compiler side of TVM was imported'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "TVM_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
