"""Pass infrastructure: analysis caching and invalidation, contracts, registry, determinism."""

import numpy as np
import pytest

import sparsegraph as sg
from sparsegraph.pass_manager import PassResult, check
from sparsegraph.passes.analysis.roles import Roles
from sparsegraph.passes.analysis.sparsifiable import SparsifiableOps

from paths import FIXTURES


def _model():
    return sg.Model.load(FIXTURES / "llama_tiny.onnx")


def test_required_analyses_are_computed_once_until_a_rewrite():
    model = _model()
    steps = [sg.get_pass("roles")(), sg.get_pass("weight_stats")(), sg.get_pass("cost_model")()]
    ctx = sg.PassManager(steps).run(model)
    # sparsifiable is required by all three but computed once; roles ran once as a step
    assert ctx.computed["sparsifiable"] == 1
    assert ctx.computed["roles"] == 1
    ctx = sg.PassManager([sg.get_pass("magnitude")(sparsity=0.5), sg.get_pass("nm")(n=2, m=4)]).run(model)
    # each rewrite needs sparsifiable + roles; the first rewrite invalidates them
    assert ctx.computed["sparsifiable"] == 2 and ctx.computed["roles"] == 2
    assert SparsifiableOps not in ctx.findings  # dropped after the last rewrite


def test_unmodified_rewrite_keeps_findings():
    model = _model()
    ctx = sg.PassManager(
        [sg.get_pass("magnitude")(sparsity=0.0), sg.get_pass("magnitude")(sparsity=0.0)]
    ).run(model)
    assert ctx.computed["sparsifiable"] == 2  # zero sparsity still reports the ops it visited
    ctx = sg.PassContext()
    first = ctx.get(Roles, model)
    assert ctx.get(Roles, model) is first


def test_seeded_rng_is_deterministic_and_name_dependent():
    a, b = sg.PassContext(seed=3), sg.PassContext(seed=3)
    assert a.rng("x").integers(1 << 30) == b.rng("x").integers(1 << 30)
    assert a.rng("x").integers(1 << 30) != a.rng("y").integers(1 << 30)
    assert sg.PassContext(seed=4).rng("x").integers(1 << 30) != sg.PassContext(seed=3).rng("x").integers(
        1 << 30
    )


def test_same_recipe_same_bytes(tmp_path):
    recipe = {
        "steps": [
            {"pass": "magnitude", "sparsity": 0.4, "granularity": "global"},
            {"pass": "block", "sparsity": 0.25, "block": [2, 2], "targets": ["role:attn.*"]},
        ]
    }
    paths = []
    for i in range(2):
        model = _model()
        sg.PassManager(sg.Recipe.load(recipe).steps, seed=11).run(model)
        paths.append(model.save(tmp_path / f"m{i}.onnx"))
    assert paths[0].read_bytes() == paths[1].read_bytes()


class _Breaks(sg.RewritePass):
    name = "test_breaks_contract"

    def run(self, model, ctx):
        return PassResult(False)

    def postcondition(self, model, ctx, result):
        check(result.modified, self.name, "expected a modification")


class _NeedsGemm(sg.RewritePass):
    name = "test_needs_gemm"

    def precondition(self, model, ctx):
        check(any(n.op == "Gemm" for n in model.graph.nodes), self.name, "model has no Gemm")

    def run(self, model, ctx):
        return PassResult(False)


def test_pre_and_post_conditions_raise_pass_error():
    with pytest.raises(sg.PassError, match="expected a modification"):
        sg.PassManager([_Breaks()]).run(_model())
    with pytest.raises(sg.PassError, match="no Gemm"):
        sg.PassManager([_NeedsGemm()]).run(_model())


def test_registry_lists_builtin_passes_and_rejects_unknown():
    names = set(sg.registry())
    assert {
        "magnitude",
        "topk",
        "nm",
        "block",
        "lowrank",
        "sparsifiable",
        "roles",
        "weight_stats",
        "cost_model",
    } <= names
    with pytest.raises(sg.RecipeError, match="unknown pass 'magnitud'"):
        sg.get_pass("magnitud")


def test_config_errors_name_pass_and_key():
    with pytest.raises(sg.RecipeError, match="pass 'magnitude': unknown key 'sparsty'"):
        sg.get_pass("magnitude")(sparsty=0.5)
    with pytest.raises(sg.RecipeError, match="sparsity"):
        sg.get_pass("magnitude")(sparsity=1.0)
    with pytest.raises(sg.RecipeError, match="N must not exceed M"):
        sg.get_pass("nm")(n=5, m=4)


def test_weight_stats_and_cost_model_agree_with_numpy():
    model = _model()
    ctx = sg.PassContext()
    ops = ctx.get(SparsifiableOps, model)
    stats = ctx.get(sg.get_pass("weight_stats"), model)
    costs = ctx.get(sg.get_pass("cost_model"), model)
    for op in ops:
        w = op.weight.matrix().astype(np.float64)
        s = stats[op.name]
        assert s.params == w.size and s.nonzeros == np.count_nonzero(w)
        assert s.l2 == pytest.approx(np.linalg.norm(w)) and s.max_abs == pytest.approx(np.abs(w).max())
        assert sum(s.log10_hist) == s.nonzeros
        assert costs[op.name].flops_dense == 2 * w.size
        assert costs[op.name].bytes_dense == w.size * 4
