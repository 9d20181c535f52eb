"""FoldConstantCalls (graphopt/targets/_fold.py): every call_tir of constants folded, one
host build per round, the folded kernels dropped, the numbers unchanged."""

import numpy as np
import tvm
from tvm import relax, topi

import graphopt
from graphopt.targets import _fold
from tests.conftest import zoo_model


def _module() -> tuple[tvm.IRModule, np.ndarray]:
    """main(x) = x + (w^T + 1) + (w * w)^T, w a constant: two transforms of w (one round)
    and one of a transform's result (a second round)."""
    w = np.arange(12, dtype="float32").reshape(3, 4)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4, 3], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = relax.const(w)
            t = bb.emit_te(topi.transpose, c)
            u = bb.emit_te(lambda a: topi.add(a, 1.0), t)
            v = bb.emit_te(lambda a: topi.transpose(topi.multiply(a, a)), c)
            y = bb.emit(relax.op.add(x, u))
            out = bb.emit_output(relax.op.add(y, v))
        bb.emit_func_output(out)
    return bb.get(), w.T + 1 + (w * w).T


def _call_tirs(mod: tvm.IRModule) -> int:
    found = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: (
            found.append(e)
            if isinstance(e, relax.Call) and e.op.same_as(tvm.ir.Op.get("relax.call_tir"))
            else None
        ),
    )
    return len(found)


def test_folds_every_constant_call_in_one_build_per_round(monkeypatch):
    mod, expected = _module()
    assert _call_tirs(mod) == 3
    rounds = []
    run_calls = _fold._run_calls
    monkeypatch.setattr(
        _fold, "_run_calls", lambda m, found: rounds.append(len(found)) or run_calls(m, found)
    )
    folded = _fold.FoldConstantCalls()(mod)
    assert rounds == [2, 1]  # t and v together, then u from t's constant
    assert _call_tirs(folded) == 0
    assert not [f for _, f in folded.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    # the folded module computes what the original does
    x = np.random.default_rng(0).standard_normal((4, 3)).astype("float32")
    for m in (mod, folded):
        lib = tvm.compile(relax.transform.LegalizeOps()(m), target="llvm")
        vm = relax.VirtualMachine(lib, tvm.cpu())
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(got, x + expected, rtol=1e-6)


def test_a_model_compiles_with_its_weights_folded_and_verifies(tmp_path):
    """A CNN's weight transforms (packed layout, Winograd) fold here; FoldConstant then
    finds none; the artifact verifies against onnxruntime."""
    art = graphopt.compile(zoo_model("resnet18"), "x86", tmp_path / "m.so")
    assert art.manifest["verification"]["ok"]
