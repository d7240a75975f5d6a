"""OWL layer sparsities, the sensitivity analysis and its budget allocator, the per-op
sparsity plans pruning passes apply (`sparsity: owl|sensitivity`), and ASVD: the math by
hand and by property, the passes on small graphs and on stories260K."""

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsegraph as sg
from sparsegraph.calibration import Calibration
from sparsegraph.eval.perplexity import load_stories, perplexity, token_windows
from sparsegraph.eval.tokenizer import Llama2cTokenizer
from sparsegraph.passes.analysis.owl import Owl, outlier_ratio, owl_sparsities
from sparsegraph.passes.analysis.roles import Roles
from sparsegraph.passes.analysis.sensitivity import Sensitivity, allocate_sparsity, plot_sensitivity
from sparsegraph.passes.analysis.sparsifiable import SparsifiableOps
from sparsegraph.passes.rewrite.asvd import activation_scale, asvd_factors
from sparsegraph.passes.rewrite.lowrank import choose_rank, low_rank_factors
from sparsegraph.passes.rewrite.magnitude import magnitude_mask
from sparsegraph.passes.rewrite.sparsegpt import set_matrix
from sparsegraph.passes.rewrite.wanda import wanda_mask
from sparsegraph.sparsity_plan import PLAN_KEY, spread_sparsity

import graphs as g
from paths import EXAMPLES, STORIES

TEXT = EXAMPLES / "data" / "tinystories_valid.txt"
TOKENIZER = EXAMPLES / "stories260K" / "tok512.bin"


# ====================================================================== fixtures, helpers
@pytest.fixture(scope="module")
def stories():
    """Model, calibration (32 windows of 64 tokens, first half of the stories), held-out
    windows (second half)."""
    tok = Llama2cTokenizer(TOKENIZER)
    docs = load_stories(TEXT)
    model = sg.Model.load(STORIES)
    calib = Calibration.from_text(docs[: len(docs) // 2], tok, model, samples=32, seqlen=64, seed=0)
    held_out = token_windows(tok, docs[len(docs) // 2 :], seq_len=128, max_windows=12)
    return model, calib, held_out


def _run(model, steps, calib=None, **extras):
    model = model.copy()
    ctx = sg.PassContext()
    if calib is not None:
        ctx.extras["calibration"] = calib
    ctx.extras.update(extras)
    ctx = sg.PassManager(sg.Recipe.load({"steps": steps}).steps).run(model, ctx)
    return model, ctx


def _weights(model) -> dict[str, np.ndarray]:
    return {op.name: op.weight.matrix() for op in sg.PassContext().get(SparsifiableOps, model)}


def _batches(x: np.ndarray, size: int = 4):
    return Calibration([{"X": x[i : i + size]} for i in range(0, len(x), size)])


def _session(model):
    return ort.InferenceSession(model.to_proto().SerializeToString(), providers=["CPUExecutionProvider"])


# ============================================================ spread / OWL / allocation math
@st.composite
def _units(draw, positive=False):
    n = draw(st.integers(1, 12))
    lo = 1e-4 if positive else 0.0
    values = draw(st.lists(st.floats(lo, 0.3, allow_subnormal=False), min_size=n, max_size=n))
    sizes = draw(st.lists(st.integers(1, 5000), min_size=n, max_size=n))
    return np.array(values), np.array(sizes, dtype=float)


@settings(max_examples=200, deadline=None)
@given(_units(), st.floats(0.0, 0.97), st.floats(0.0, 0.4))
def test_owl_sparsities_have_the_target_mean_within_bounds_and_follow_outliers(units, target, lam):
    ratios, sizes = units
    s = owl_sparsities(ratios, target, lam, sizes)
    lo, hi = max(0.0, target - lam), max(min(target + lam, 0.99), target)
    assert np.dot(s, sizes) / sizes.sum() == pytest.approx(target, abs=1e-9)  # the budget, in params
    assert np.all(s >= lo - 1e-12) and np.all(s <= hi + 1e-12)
    i, j = np.meshgrid(range(len(s)), range(len(s)))
    assert np.all(s[i][ratios[i] > ratios[j]] <= s[j][ratios[i] > ratios[j]] + 1e-12)  # more outliers: lower
    if np.ptp(ratios) > 0 and lam > 0:  # as wide as allowed: the full 2λ range, or a bound reached
        assert (
            math.isclose(np.ptp(s), 2 * lam, rel_tol=1e-9)
            or math.isclose(s.max(), hi, abs_tol=1e-9)
            or math.isclose(s.min(), lo, abs_tol=1e-9)
        )


def test_owl_sparsities_equal_the_reference_code_when_it_stays_in_bounds():
    # Yin et al.'s prune_wanda_outlier: r = (r - min) / (max - min) * 2λ; r = r - mean(r) + (1 - S);
    # layer sparsity = 1 - r. Inside [S - λ, S + λ] exactly when the normalised ratios average 0.5.
    ratios, target, lam = np.array([0.02, 0.05, 0.035, 0.08, 0.065]), 0.7, 0.08
    r = (ratios - ratios.min()) / np.ptp(ratios) * 2 * lam
    reference = 1 - (r - r.mean() + (1 - target))
    np.testing.assert_allclose(owl_sparsities(ratios, target, lam), reference, atol=1e-12)
    skewed = np.array([0.01, 0.01, 0.01, 0.2])  # the reference gives 0.7 - 0.12 for the last: out of bounds
    s = owl_sparsities(skewed, target, lam)
    assert s.mean() == pytest.approx(target) and s.min() == pytest.approx(target - lam) and s[0] > target
    np.testing.assert_array_equal(owl_sparsities([0.03] * 4, 0.5, 0.1), [0.5] * 4)


def test_outlier_ratio_counts_scores_above_m_times_the_layer_mean():
    a = np.array([[1.0, 1.0], [1.0, 1.0]])
    b = np.array([[1.0, 30.0]])  # mean of all six: 35 / 6; 5x: 29.2
    assert outlier_ratio([a, b], 5) == pytest.approx(1 / 6)
    assert outlier_ratio([a, b], 6) == 0.0
    with pytest.raises(ValueError, match="no scores"):
        outlier_ratio([np.zeros(0)])


@settings(max_examples=200, deadline=None)
@given(_units(), st.floats(0.0, 0.95), st.floats(0.0, 0.4))
def test_allocate_sparsity_meets_the_global_budget_exactly(units, target, lam):
    deltas, sizes = units
    names = [f"op{i}" for i in range(len(deltas))]
    alloc = allocate_sparsity(
        dict(zip(names, deltas, strict=True)), target, dict(zip(names, sizes, strict=True)), lam
    )
    s = np.array([alloc[n] for n in names])
    assert np.dot(s, sizes) / sizes.sum() == pytest.approx(target, abs=1e-9)
    lo, hi = max(0.0, target - lam), max(min(target + lam, 0.99), target)
    assert np.all(s >= lo - 1e-12) and np.all(s <= hi + 1e-12)
    per_param = np.maximum(deltas, deltas[deltas > 0].min() / 10 if np.any(deltas > 0) else 0) / sizes
    for i in range(len(s)):  # more loss per parameter: never pruned more
        assert np.all(s[per_param > per_param[i]] <= s[i] + 1e-12)


def test_allocate_sparsity_prunes_the_less_sensitive_more():
    alloc = allocate_sparsity({"a": 0.5, "b": 0.01, "c": 0.05}, 0.6, {"a": 100, "b": 100, "c": 200}, lam=0.2)
    assert alloc["a"] < alloc["c"] < alloc["b"]
    assert (100 * alloc["a"] + 100 * alloc["b"] + 200 * alloc["c"]) / 400 == pytest.approx(0.6, abs=1e-12)
    assert allocate_sparsity({"a": -0.1, "b": 0.0}, 0.5) == {"a": 0.5, "b": 0.5}  # nothing hurt: uniform
    with pytest.raises(ValueError):
        spread_sparsity([0.1, 0.2], 1.0, 0.1)


# ======================================================================== OWL on stories260K
def test_owl_plans_per_layer_sparsities_from_wanda_score_outliers(stories):
    model, calib, _ = stories
    _, ctx = _run(model, [{"pass": "owl", "sparsity": 0.7}], calib)
    finding = ctx.findings[Owl]
    ops = sg.PassContext().get(SparsifiableOps, model)
    roles = sg.PassContext().get(Roles, model)
    body = [op for op in ops if op.op_type == "MatMul" and roles.get(op.name).layer is not None]
    stats = calib.statistics(model, body)
    assert [g_.layer for g_ in finding.layers] == [0, 1, 2, 3, 4]
    for layer in finding.layers:  # an independent count per layer
        mine = [op for op in body if roles.get(op.name).layer == layer.layer]
        assert layer.ops == [op.name for op in mine]
        scores = np.concatenate(
            [(np.abs(op.weight.matrix().astype(np.float64)) * stats[op.name].norm).ravel() for op in mine]
        )
        assert layer.outlier_ratio == pytest.approx(np.mean(scores > 5 * scores.mean()), abs=1e-12)
    ratios = np.array([g_.outlier_ratio for g_ in finding.layers])
    sparsity = np.array([g_.sparsity for g_ in finding.layers])
    assert np.ptp(ratios) > 0 and sparsity.mean() == pytest.approx(0.7, abs=1e-12)
    assert np.all(sparsity >= 0.62 - 1e-12) and np.all(sparsity <= 0.78 + 1e-12)
    assert list(np.argsort(-ratios, kind="stable")) == list(np.argsort(sparsity, kind="stable"))
    plan = ctx.extras[PLAN_KEY]
    assert plan.source == "owl" and len(plan.sparsity) == 35
    assert all(plan.sparsity[op] == layer.sparsity for layer in finding.layers for op in layer.ops)
    _, ctx = _run(model, [{"pass": "owl", "sparsity": 0.5, "lam": 0.05, "M": 3}], calib)  # aliases, M
    s = [g_.sparsity for g_ in ctx.findings[Owl].layers]
    assert max(s) <= 0.55 + 1e-12 and min(s) >= 0.45 - 1e-12 and ctx.findings[Owl].m == 3


def test_owl_then_wanda_applies_each_layers_sparsity(stories):
    model, calib, _ = stories
    steps = [{"pass": "owl", "sparsity": 0.7}, {"pass": "wanda", "sparsity": "owl"}]  # one-shot: dense stats
    pruned, ctx = _run(model, steps, calib)
    plan = ctx.extras[PLAN_KEY]
    assert plan.used_by == ["wanda"] and ctx.history[1][1].warnings == []
    ops = sg.PassContext().get(SparsifiableOps, model).by_name()
    stats = calib.statistics(model, [ops[name] for name in plan.sparsity])
    after = _weights(pruned)
    for name, s in plan.sparsity.items():
        w = ops[name].weight.matrix()
        np.testing.assert_array_equal(after[name], w * wanda_mask(w, stats[name].norm, s), err_msg=name)
    assert after["output"].all()  # the lm_head is not a default target


def test_owl_wanda_end_to_end_on_stories260k(stories, tmp_path):
    _, calib, held_out = stories
    steps = [{"pass": "owl", "sparsity": 0.7}, {"pass": "wanda", "sparsity": "owl", "sequential": True}]
    recipe = {"steps": steps}
    result = sg.compile_model(STORIES, recipe, tmp_path / "out", calib=calib)
    report = result.report
    planned = {op: layer["sparsity"] for layer in report["owl"]["layers"] for op in layer["ops"]}
    rows = {r["op"]: r for r in report["ops"]}
    for name, s in planned.items():  # per output row: floor(s * K) of K weights zeroed
        k = rows[name]["shape"][1]
        assert rows[name]["sparsity_after"] == pytest.approx(math.floor(s * k) / k, abs=1e-9), name
    body = [rows[name] for name in planned]
    total = 1 - sum(r["nonzeros_after"] for r in body) / sum(r["params"] for r in body)
    assert total == pytest.approx(0.7, abs=0.01)
    assert "## OWL layer sparsities" in (tmp_path / "out" / "report.md").read_text()
    assert "owl" in json.loads((tmp_path / "out" / "report.json").read_text())
    ppl = perplexity(result.portable, held_out).ppl
    assert math.isfinite(ppl) and ppl > perplexity(STORIES, held_out).ppl


# ============================================================== plan rules and recipe errors
def test_plan_errors_name_the_pass_and_the_problem(stories):
    model, calib, _ = stories
    with pytest.raises(sg.RecipeError, match=r"'wanda': sparsity: owl needs an earlier step 'pass: owl'"):
        _run(model, [{"pass": "wanda", "sparsity": "owl"}], calib)
    with pytest.raises(sg.RecipeError, match=r"'magnitude': sparsity: sensitivity needs .* with allocate"):
        _run(model, [{"pass": "magnitude", "sparsity": "sensitivity"}])
    with pytest.raises(sg.RecipeError, match="latest sparsity plan comes from 'owl', not 'sensitivity'"):
        steps = [{"pass": "owl", "sparsity": 0.5}, {"pass": "sparsegpt", "sparsity": "sensitivity"}]
        _run(model, steps, calib)
    steps = [
        {"pass": "owl", "sparsity": 0.5, "targets": ["role:attn.*"]},
        {"pass": "magnitude", "sparsity": "owl"},
    ]
    with pytest.raises(sg.RecipeError, match="op 'layers.0.feed_forward.w1' has no planned sparsity"):
        _run(model, steps, calib)
    steps[1]["targets"] = ["role:attn.q"]  # a subset is fine: the rest of the plan is left for later
    _, ctx = _run(model, steps, calib)
    assert "15 op(s) of the owl plan are not targets" in ctx.history[1][1].warnings[0]
    steps = [{"pass": "owl", "sparsity": 0.5}, {"pass": "magnitude", "sparsity": 0.5}]
    _, ctx = _run(model, steps, calib)
    assert "the plan is not applied (write sparsity: owl" in ctx.history[1][1].warnings[0]
    steps = [{"pass": "owl", "sparsity": 0.5}, {"pass": "owl", "sparsity": 0.6}]
    _, ctx = _run(model, steps, calib)
    assert "replaced the sparsity plan from 'owl', which no step applied" in ctx.history[1][1].warnings[0]


@pytest.mark.parametrize(
    "step, message",
    [
        ({"pass": "magnitude", "sparsity": "owl", "granularity": "global"}, "cannot use granularity: global"),
        ({"pass": "magnitude", "sparsity": "olw"}, "one of 'owl', 'sensitivity'"),
        ({"pass": "wanda", "sparsity": "owl", "n": 2, "m": 4}, "either sparsity"),
        ({"pass": "wanda", "sparsity": 1.2}, r"sparsity must lie in \[0, 1\)"),
        ({"pass": "nm", "n": 2, "m": 4, "sparsity": "owl"}, "unknown key 'sparsity'"),
        ({"pass": "owl", "sparsity": "owl"}, "sparsity"),
        ({"pass": "owl", "sparsity": 0.5, "lam": 1.5}, "lam: Input should be less than 1"),
        ({"pass": "sensitivity", "granularity": "row"}, "granularity"),
        ({"pass": "asvd", "param_ratio": 0.5, "alpha": -1}, "alpha"),
    ],
)
def test_unknown_combinations_are_recipe_errors_at_load(step, message):
    with pytest.raises(sg.RecipeError, match=message):
        sg.Recipe.load({"steps": [step]})


def test_recipes_round_trip_with_aliases():
    recipe = sg.Recipe.load(
        {"steps": [{"pass": "owl", "sparsity": 0.7, "lambda": 0.1}, {"pass": "wanda", "sparsity": "owl"}]}
    )
    assert recipe.steps[0].config.lambda_ == 0.1
    again = sg.Recipe.load(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict() and again.steps[1].config.sparsity == "owl"


def test_passes_needing_calibration_say_so():
    for name, params in (("owl", {"sparsity": 0.5}), ("asvd", {"param_ratio": 0.5}), ("sensitivity", {})):
        with pytest.raises(sg.RecipeError, match=f"pass '{name}' needs calibration data"):
            _run(sg.Model.from_proto(g.matmul_chain()), [{"pass": name, **params}])


# ================================================================== sensitivity: small graph
def test_sensitivity_output_metrics_rank_a_fragile_op_first():
    rng = np.random.default_rng(0)
    proto = g.matmul_chain(dims=(8, 12, 6), batch=4)
    model = sg.Model.from_proto(proto)
    ops = sg.PassContext().get(SparsifiableOps, model).by_name()
    w0 = rng.standard_normal((12, 8)).astype(np.float32)
    w0[rng.random(w0.shape) < 0.6] *= 1e-3  # mostly tiny weights: magnitude pruning at 50 % is harmless
    set_matrix(ops["mm0"].weight, w0)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    calib = _batches(x)
    w1 = ops["mm1"].weight.matrix()
    y0 = x @ w0.T @ w1.T
    for metric in ("mse", "cosine"):
        _, ctx = _run(model, [{"pass": "sensitivity", "metric": metric, "targets": ["op:*"]}], calib)
        finding = ctx.findings[Sensitivity]
        assert finding.metric == metric and finding.baseline == 0.0 and finding.samples == 16
        assert [r.unit for r in finding.ranked()] == ["mm1", "mm0"]
        masks = ((magnitude_mask(w0, 0.5), 1), (1, magnitude_mask(w1, 0.5)))
        for row, (a, b) in zip(finding.rows, masks, strict=True):
            y = x @ (w0 * a).T @ (w1 * b).T
            if metric == "mse":
                expected = np.sum((y - y0) ** 2, dtype=np.float64) / np.sum(y0**2, dtype=np.float64)
            else:
                expected = 1 - np.sum(y * y0, dtype=np.float64) / np.linalg.norm(y) / np.linalg.norm(y0)
            assert row.delta == pytest.approx(expected, rel=1e-4, abs=1e-6)  # float32 rounding
    _, ctx = _run(model, [{"pass": "sensitivity", "samples": 5, "targets": ["op:*"]}], calib)
    finding = ctx.findings[Sensitivity]
    assert finding.metric == "mse" and finding.samples == 8  # whole batches


# ============================================================= sensitivity on stories260K
def test_sensitivity_ranks_the_lm_head_first_and_measures_nll(stories):
    model, calib, held_out = stories
    step = {"pass": "sensitivity", "sparsity": 0.5, "samples": 8, "targets": ["op:MatMul"]}
    _, ctx = _run(model, [step], calib)
    finding = ctx.findings[Sensitivity]
    assert finding.metric == "nll" and finding.samples == 8 and len(finding.rows) == 36
    assert finding.ranked()[0].unit == "output" and finding.ranked()[0].role == "lm_head"
    windows = [row for b in calib.batches() for row in b["tokens"]][:8]
    assert finding.baseline == pytest.approx(perplexity(STORIES, windows).mean_nll, rel=1e-9)
    probe = model.copy()  # one unit by hand
    op = sg.PassContext().get(SparsifiableOps, probe).by_name()["layers.1.attention.wk"]
    op.weight.apply_mask(magnitude_mask(op.weight.matrix(), 0.5))
    by_hand = perplexity(_session(probe), windows).mean_nll
    row = next(r for r in finding.rows if r.unit == "layers.1.attention.wk")
    assert row.loss == pytest.approx(by_hand, rel=1e-9)
    assert row.delta == pytest.approx(by_hand - finding.baseline)
    assert _weights(model)["output"].all()  # the model itself is untouched
    # given evaluation windows instead of calibration rows; layers as units; no calibration needed
    step = {"pass": "sensitivity", "granularity": "layer", "samples": 3}
    _, ctx = _run(model, [step], None, eval_windows=held_out)
    finding = ctx.findings[Sensitivity]
    assert [r.unit for r in finding.rows] == [f"layer {i}" for i in range(5)] and finding.samples == 3
    assert finding.baseline == pytest.approx(perplexity(STORIES, held_out[:3]).mean_nll, rel=1e-9)
    assert all(len(r.ops) == 7 and r.params == 45312 and r.delta > 0 for r in finding.rows)


def test_sensitivity_allocation_feeds_magnitude(stories, tmp_path):
    model, calib, _ = stories
    steps = [
        {"pass": "sensitivity", "sparsity": 0.6, "allocate": 0.6, "samples": 4, "method": "wanda"},
        {"pass": "magnitude", "sparsity": "sensitivity"},
    ]
    pruned, ctx = _run(model, steps, calib)
    section = ctx.extras["report_sections"]["sensitivity"].data  # findings are dropped after a rewrite
    sizes = {r["unit"]: r["params"] for r in section["rows"]}
    alloc = ctx.extras[PLAN_KEY].sparsity
    assert alloc == {r["unit"]: r["sparsity"] for r in section["rows"]}
    assert sum(alloc[u] * sizes[u] for u in alloc) / sum(sizes.values()) == pytest.approx(0.6, abs=1e-12)
    assert len(set(alloc.values())) > 5 and min(alloc.values()) >= 0.4 - 1e-12
    after = _weights(pruned)
    for unit, s in alloc.items():  # magnitude per tensor: floor(s * N * K) zeros
        assert np.sum(after[unit] == 0) == math.floor(s * sizes[unit]), unit
    zeros = sum(np.sum(after[u] == 0) for u in alloc)
    assert abs(zeros - 0.6 * sum(sizes.values())) <= len(alloc)  # the budget, up to rounding per op
    # the report: JSON key, markdown section, plot
    result = sg.compile_model(STORIES, {"steps": steps}, tmp_path / "out", calib=calib)
    data = json.loads((tmp_path / "out" / "report.json").read_text())["sensitivity"]
    assert data["allocation"] == {"target": 0.6, "lambda": 0.2} and len(data["rows"]) == 35
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Sensitivity" in md and "![Sensitivity](sensitivity.png)" in md
    assert (tmp_path / "out" / "sensitivity.png").stat().st_size > 5000
    assert result.report["files"]["sensitivity.png"] > 5000
    assert plot_sensitivity(section, tmp_path / "again.png").stat().st_size > 5000


# ============================================================================ ASVD: math
def test_asvd_factors_with_flat_scale_are_plain_svd_factors():
    w = np.random.default_rng(1).standard_normal((12, 20)).astype(np.float32)
    a, b = asvd_factors(w, np.full(20, 3.0), 5)
    a0, b0 = low_rank_factors(w, 5)
    np.testing.assert_allclose(a @ b, a0 @ b0, rtol=1e-4, atol=1e-5)
    assert a.shape == (12, 5) and b.shape == (5, 20) and a.dtype == np.float32


def test_asvd_factors_minimise_the_scaled_error_and_survive_dead_channels():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 24))
    scale = activation_scale(np.exp(rng.standard_normal(24) * 1.5), 1.0)
    scale[[3, 9]] = 0.0  # never-active inputs
    for rank in (1, 4, 10):
        a, b = asvd_factors(w, scale, rank)
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
        err = np.linalg.norm((w - a @ b) * scale)
        best = np.linalg.svd(w * scale, compute_uv=False)[rank:]  # Eckart–Young on W·S
        assert err == pytest.approx(np.sqrt(np.sum(best**2)), rel=1e-9)
        a0, b0 = low_rank_factors(w, rank)
        assert err <= np.linalg.norm((w - a0 @ b0) * scale) + 1e-12
    a, b = asvd_factors(np.zeros((3, 4)), np.ones(4), 2)
    assert not a.any() and not b.any()
    with pytest.raises(ValueError, match="does not fit"):
        asvd_factors(w, np.ones(5), 2)


def test_asvd_beats_plain_svd_in_output_error_on_stories260k_layers(stories):
    model, calib, _ = stories
    ops = [op for op in sg.PassContext().get(SparsifiableOps, model) if op.name.startswith("layers.")]
    stats = calib.statistics(model, ops, hessian=True)
    wins, total_asvd, total_svd = 0, 0.0, 0.0
    for op in ops:  # ‖X (W - AB)ᵀ‖² = tr(E XᵀX Eᵀ) over all calibration tokens, at equal rank
        w = op.weight.matrix().astype(np.float64)
        rank = choose_rank(None, op.shape, param_ratio=0.5)
        xtx = stats[op.name].xtx
        errs = []
        for a, b in (asvd_factors(w, activation_scale(stats[op.name].norm), rank), low_rank_factors(w, rank)):
            e = w - a @ b
            errs.append(float(np.trace(e @ xtx @ e.T)))
        wins += errs[0] < errs[1]
        total_asvd, total_svd = total_asvd + errs[0], total_svd + errs[1]
    print(f"ASVD lower output error on {wins}/{len(ops)} layers; total {total_asvd:.4g} vs {total_svd:.4g}")
    assert wins >= 0.9 * len(ops) and total_asvd < 0.95 * total_svd


# ========================================================================== ASVD: the pass
@pytest.mark.parametrize(
    "build",
    [
        lambda: g.matmul_chain(dims=(16, 12, 10), batch=4),
        lambda: g.gemm(m=4, k=16, n=12, alpha=0.5, beta=2.0),
        lambda: g.gemm(m=4, k=16, n=12, trans_b=0, bias=False),
    ],
)
def test_asvd_pass_rewrites_graphs_that_match_numpy(build):
    proto = build()
    model = sg.Model.from_proto(proto)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 16)) * np.exp(rng.standard_normal(16))).astype(np.float32)
    dense = _weights(model)
    out, ctx = _run(model, [{"pass": "asvd", "rank_ratio": 0.25, "targets": ["op:*"]}], _batches(x))
    change = ctx.history[-1][1].changes[0]
    assert change.action == "lowrank" and change.detail["method"] == "asvd" and change.detail["rank"] == 3
    name = change.op
    w = dense[name]
    a, b = asvd_factors(w, activation_scale(np.linalg.norm(x.astype(np.float64), axis=0)), 3)
    got = g.run_ort(out.to_proto(), {"X": x[:4]})[0]
    if name == "mm0":  # mm1 is factored too, scaled by its input on the dense model (rank round(2.5) = 2)
        h = x.astype(np.float64) @ w.T.astype(np.float64)
        a1, b1 = asvd_factors(dense["mm1"], activation_scale(np.linalg.norm(h, axis=0)), 2)
        assert ctx.history[-1][1].changes[1].detail["rank"] == 2
    if name == "gemm":
        attrs = {a_.name: a_ for a_ in proto.graph.node[0].attribute}
        alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
        beta = attrs["beta"].f if "beta" in attrs else 1.0
        bias = g.initializer(proto, "C") if len(proto.graph.node[0].input) > 2 else 0.0
        expected = alpha * x[:4] @ (a @ b).T + beta * bias
    else:
        expected = x[:4] @ (a @ b).T @ (a1 @ b1).T
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert g.num_weights(out.to_proto()) < g.num_weights(proto)


def test_asvd_with_alpha_zero_is_lowrank_and_skips_what_would_not_shrink():
    proto = g.matmul_chain(dims=(16, 12, 10), batch=4)
    x = np.random.default_rng(4).standard_normal((8, 16)).astype(np.float32)
    step = {"rank_ratio": 0.25, "targets": ["name:mm0"]}
    ours, _ = _run(sg.Model.from_proto(proto), [{"pass": "asvd", "alpha": 0.0, **step}], _batches(x))
    theirs, _ = _run(sg.Model.from_proto(proto), [{"pass": "lowrank", **step}])
    np.testing.assert_allclose(
        g.run_ort(ours.to_proto(), {"X": x[:4]})[0], g.run_ort(theirs.to_proto(), {"X": x[:4]})[0], rtol=1e-4
    )
    step = {"pass": "asvd", "rank_ratio": 1.0, "targets": ["op:*"]}
    _, ctx = _run(sg.Model.from_proto(proto), [step], _batches(x))
    result = ctx.history[-1][1]
    assert not result.modified and {c.action for c in result.changes} == {"skipped"}


def test_asvd_on_stories260k_runs_in_onnxruntime_like_the_dense_product(stories, tmp_path):
    model, calib, held_out = stories
    recipe = {"steps": [{"pass": "asvd", "param_ratio": 0.5}]}
    result = sg.compile_model(STORIES, recipe, tmp_path / "out", calib=calib)
    rows = [r for r in result.report["ops"] if r["applied"] == ["lowrank"]]
    assert len(rows) == 35 and result.report["totals"]["params_after"] < result.report["totals"]["params"]
    assert all(r["params_after"] <= 0.5 * r["params"] for r in rows)
    # the same model with each W replaced by the dense product A @ B of its stored factors
    factored = sg.Model.load(result.portable)
    consts = {t.name: t.values for t in factored.constants()}
    dense = model.copy()
    for op in sg.PassContext().get(SparsifiableOps, dense):
        if f"{op.name}/lowrank_U" in consts:
            u, v = consts[f"{op.name}/lowrank_U"], consts[f"{op.name}/lowrank_V"]  # X @ U @ V
            set_matrix(op.weight, (u @ v).T)
    tokens = np.stack([w[:64] for w in held_out if len(w) >= 64][:4])
    got = _session(factored).run(["logits"], {"tokens": tokens})[0]
    want = _session(dense).run(["logits"], {"tokens": tokens})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert math.isfinite(perplexity(result.portable, held_out[:4]).ppl)
