"""The rewrite-rule engine: matching, binding, declining, replacing, shape checks."""

import numpy as np
import pytest
from onnx import helper

from graphopt.frontends.onnx import onnx_to_graph
from graphopt.passes import PassError, RewriteRule, apply_rules, rewrite_pass
from graphopt.passes._rewrite import find_matches
from tests.conftest import make_model
from tests.passes._util import random_inputs, run_ort


def relu_relu(op, x):
    return op.Relu(op.Relu(x))


def one_relu(op, x):
    return op.Relu(x)


def mul_square(op, x):
    return op.Mul(x, x)


def pow2(op, x):
    return op.Pow(x, np.array(2.0, dtype=np.float32))


def _graph(nodes, inputs=None, outputs=None, inits=()):
    inputs = inputs or {"x": (2, 3)}
    outputs = outputs or {"y": (2, 3)}
    return onnx_to_graph(make_model(nodes, inputs, outputs, inits))


def test_rule_fires_and_keeps_the_result_name_and_numbers():
    g = _graph(
        [
            helper.make_node("Relu", ["x"], ["a"], name="r1"),
            helper.make_node("Relu", ["a"], ["y"], name="r2"),
        ]
    )
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    stats = apply_rules(g, [RewriteRule(relu_relu, one_relu)])
    assert stats == {"relu_relu": 1}
    assert g.op_counts() == {"Relu": 1}
    (node,) = g.nodes()
    assert node.outputs == ["y"] and node.inputs == ["x"] and node.name == "r2"
    np.testing.assert_array_equal(run_ort(g, inputs)[0], before[0])


def test_chains_rewrite_to_a_fixed_point():
    nodes = [helper.make_node("Relu", ["x"], ["a0"])]
    nodes += [helper.make_node("Relu", [f"a{i}"], [f"a{i + 1}"]) for i in range(4)]
    nodes.append(helper.make_node("Relu", ["a4"], ["y"]))
    g = _graph(nodes)
    stats = apply_rules(g, [RewriteRule(relu_relu, one_relu)])
    assert g.op_counts() == {"Relu": 1} and stats["relu_relu"] == 5


def test_variable_used_twice_must_bind_one_value():
    rule = RewriteRule(mul_square, pow2)
    same = _graph([helper.make_node("Mul", ["x", "x"], ["y"])])
    assert len(find_matches(same, rule)) == 1
    other = _graph([helper.make_node("Mul", ["x", "z"], ["y"])], inputs={"x": (2, 3), "z": (2, 3)})
    assert find_matches(other, rule) == []


def test_commutative_ops_match_either_order():
    def sig_mul(op, x):
        return op.Mul(x, op.Sigmoid(x))

    rule = RewriteRule(sig_mul, lambda op, x: op.Mul(x, op.Sigmoid(x)), name="noop")
    for order in (["x", "s"], ["s", "x"]):
        g = _graph(
            [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", order, ["y"])]
        )
        assert len(find_matches(g, rule)) == 1, order


def test_non_commutative_ops_keep_input_order():
    def sub_sig(op, x):
        return op.Sub(x, op.Sigmoid(x))

    rule = RewriteRule(sub_sig, lambda op, x: x, name="r")
    g = _graph(
        [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Sub", ["s", "x"], ["y"])]
    )
    assert find_matches(g, rule) == []


def test_intermediate_with_outside_user_is_not_matched():
    g = _graph(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Relu", ["a"], ["y"]),
            helper.make_node("Neg", ["a"], ["z"]),
        ],
        outputs={"y": (2, 3), "z": (2, 3)},
    )
    assert apply_rules(g, [RewriteRule(relu_relu, one_relu)]) == {}
    assert g.op_counts() == {"Relu": 2, "Neg": 1}


def test_pattern_attributes_must_be_equal():
    def flat1(op, x):
        return op.Flatten(x, axis=1)

    rule = RewriteRule(flat1, lambda op, x: op.Flatten(x, axis=1), name="r")
    g1 = _graph([helper.make_node("Flatten", ["x"], ["y"], axis=1)])
    g0 = _graph([helper.make_node("Flatten", ["x"], ["y"], axis=0)], outputs={"y": (1, 6)})
    assert len(find_matches(g1, rule)) == 1 and find_matches(g0, rule) == []


def test_check_reason_declines():
    g = _graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["y"])])
    seen = []

    def never(graph, match):
        seen.append((match["x"], match.root.op_type))
        return "not today"

    assert apply_rules(g, [RewriteRule(relu_relu, one_relu, never)]) == {}
    assert seen == [("x", "Relu")] and g.op_counts() == {"Relu": 2}


def test_position_is_priority():
    g = _graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["y"])])
    first = RewriteRule(relu_relu, one_relu, name="first")
    second = RewriteRule(relu_relu, lambda op, x: op.Relu(op.Relu(op.Relu(x))), name="second")
    assert apply_rules(g, [first, second]) == {"first": 1}


def test_replacement_returning_an_input_rewires_users():
    def neg_neg(op, x):
        return op.Neg(op.Neg(x))

    g = _graph(
        [
            helper.make_node("Neg", ["x"], ["a"]),
            helper.make_node("Neg", ["a"], ["b"]),
            helper.make_node("Relu", ["b"], ["y"]),
        ]
    )
    assert apply_rules(g, [RewriteRule(neg_neg, lambda op, x: x, name="r")]) == {"r": 1}
    assert g.op_counts() == {"Relu": 1} and g.nodes()[0].inputs == ["x"]


def test_replacement_returning_an_input_keeps_graph_output_names():
    def neg_neg(op, x):
        return op.Neg(op.Neg(x))

    g = _graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Neg", ["r"], ["a"]),
            helper.make_node("Neg", ["a"], ["y"]),
        ]
    )
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    apply_rules(g, [RewriteRule(neg_neg, lambda op, x: x, name="r")])
    assert g.outputs == ["y"] and g.op_counts() == {"Relu": 1, "Identity": 1}
    np.testing.assert_array_equal(run_ort(g, inputs)[0], before[0])


def test_replacement_with_new_constants_and_intermediates_gets_shapes():
    def div_const(op, x, c):
        return op.Div(x, c)

    def mul_reciprocal(op, x, c):
        return op.Mul(x, op.Reciprocal(c))

    g = _graph(
        [helper.make_node("Div", ["x", "c"], ["y"])], inits={"c": np.full((3,), 2, np.float32)}
    )
    inputs = random_inputs(g)
    before = run_ort(g, inputs)
    apply_rules(g, [RewriteRule(div_const, mul_reciprocal)])
    recip = next(n for n in g.nodes() if n.op_type == "Reciprocal")
    assert g.values[recip.outputs[0]].shape == (3,)
    np.testing.assert_allclose(run_ort(g, inputs)[0], before[0], rtol=1e-6)


def test_replacement_that_breaks_shapes_is_an_error_naming_pass_and_rule():
    def bad(op, x):
        return op.Flatten(op.Relu(x), axis=0)

    broken = rewrite_pass("broken-rule", [RewriteRule(relu_relu, bad)], "Breaks shapes.")
    g = _graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["y"])])
    with pytest.raises(PassError, match=r"pass 'broken-rule': rule 'relu_relu'.*float32\[2,3\]"):
        broken()(g)
    assert g.op_counts() == {"Relu": 2}  # nothing changed


def test_bad_rules_are_refused_when_built():
    with pytest.raises(TypeError, match="unused"):
        RewriteRule(lambda op, x, y: op.Relu(x), one_relu)
    with pytest.raises(TypeError, match="not pattern variables"):
        RewriteRule(relu_relu, lambda op, z: z)
    with pytest.raises(TypeError, match="not a pattern variable"):
        RewriteRule(lambda op, x: op.Add(x, 1.0), one_relu)


def test_rewrite_pass_is_a_named_frozen_dataclass_with_options():
    cls = rewrite_pass("relu-relu", [RewriteRule(relu_relu, one_relu)], "Merge Relu pairs.")
    p = cls(max_iterations=1)
    assert cls.name == "relu-relu" and cls.__doc__ == "Merge Relu pairs." and p.max_iterations == 1
    with pytest.raises(AttributeError):
        p.max_iterations = 3  # frozen
