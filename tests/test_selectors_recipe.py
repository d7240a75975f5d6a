"""Selectors and recipes: parsing, matching, validation errors."""

import pytest

import sparsegraph as sg
from sparsegraph.passes.analysis.roles import Roles
from sparsegraph.passes.analysis.sparsifiable import SparsifiableOps
from sparsegraph.selectors import parse_selector, select

from paths import FIXTURES


@pytest.fixture(scope="module")
def llama():
    model = sg.Model.load(FIXTURES / "llama_tiny.onnx")
    ctx = sg.PassContext()
    return model, ctx.get(SparsifiableOps, model), ctx.get(Roles, model)


def _roles(ops, roles, targets, ignore=()):
    return [
        (roles.get(op.name).role, roles.get(op.name).layer)
        for op in select(ops, roles, targets, list(ignore), "t")
    ]


def test_default_targets_skip_heads_and_embeddings(llama):
    _, ops, roles = llama
    picked = _roles(ops, roles, None)
    assert len(picked) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert not {r for r, _ in picked} & {"lm_head", "embed"}


def test_role_layer_and_intersection(llama):
    _, ops, roles = llama
    assert _roles(ops, roles, ["role:ffn.*"]) == [
        (r, layer) for layer in (0, 1) for r in ("ffn.gate", "ffn.up", "ffn.down")
    ]
    assert _roles(ops, roles, ["role:attn.q & layers:1"]) == [("attn.q", 1)]
    assert _roles(ops, roles, ["role:ffn.down", "role:attn.o"], ignore=["layers:0"]) == [
        ("attn.o", 1),
        ("ffn.down", 1),
    ]
    assert _roles(ops, roles, ["op:Gather"]) == [("embed", None)]
    assert _roles(ops, roles, ["role:lm_head"]) == [("lm_head", None)]


def test_name_glob_and_regex_match_node_or_weight_names(llama):
    _, ops, roles = llama
    some = ops.linear[3]
    assert [op.name for op in select(ops, roles, [f"name:{some.name}"], [], "t")] == [some.name]
    assert [op.name for op in select(ops, roles, [f"name:{some.weight.name}"], [], "t")] == [some.name]
    assert [op.name for op in select(ops, roles, [f"re:^{some.name}$"], [], "t")] == [some.name]


def test_fused_qkv_matches_component_roles():
    model = sg.Model.load(FIXTURES / "gpt2_tiny.onnx")
    ctx = sg.PassContext()
    ops, roles = ctx.get(SparsifiableOps, model), ctx.get(Roles, model)
    names = [op.name for op in select(ops, roles, ["role:attn.k"], [], "t")]
    assert len(names) == 2 and all(roles.get(n).role == "attn.qkv" for n in names)


@pytest.mark.parametrize(
    "text, message",
    [
        ("ffn.*", "bad selector"),
        ("role:", "empty value"),
        ("role:fnn.up", "matches no known role"),
        ("layers:3-1", "empty or negative"),
        ("layers:a", "layers must look like"),
        ("re:([", "bad regular expression"),
        ("kind:x", "bad selector"),
    ],
)
def test_bad_selectors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_selector(text)


def test_selector_matching_nothing_is_an_error(llama):
    _, ops, roles = llama
    with pytest.raises(sg.RecipeError, match="'layers:7' matched no op"):
        select(ops, roles, ["layers:7"], [], "t")
    with pytest.raises(sg.RecipeError, match="ignore selector 'op:Conv' matched no op"):
        select(ops, roles, None, ["op:Conv"], "t")


def test_recipe_from_yaml_text_dict_list_and_file(tmp_path):
    text = "steps:\n  - pass: nm\n    n: 2\n    m: 4\n    targets: ['role:ffn.*']\n"
    (tmp_path / "r.yaml").write_text(text)
    for source in (
        text,
        {"steps": [{"pass": "nm", "targets": ["role:ffn.*"]}]},
        [{"pass": "nm", "targets": ["role:ffn.*"]}],
        tmp_path / "r.yaml",
        str(tmp_path / "r.yaml"),
    ):
        recipe = sg.Recipe.load(source)
        assert [p.name for p in recipe.steps] == ["nm"]
        assert recipe.steps[0].config.n == 2 and recipe.steps[0].config.targets == ["role:ffn.*"]


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"stepz": []}, "unknown top-level key 'stepz'"),
        ({"steps": []}, "non-empty list"),
        ({"steps": [{"sparsity": 0.5}]}, "step 1: each step is a mapping with a 'pass:' key"),
        ({"steps": [{"pass": "prune"}]}, "step 1: unknown pass 'prune'"),
        (
            {"steps": [{"pass": "magnitude", "sparsity": 0.5}, {"pass": "magnitude", "sparsiti": 0.5}]},
            "step 2: pass 'magnitude': unknown key 'sparsiti'",
        ),
        ({"steps": [{"pass": "magnitude", "sparsity": 1.5}]}, "sparsity"),
        ({"steps": [{"pass": "magnitude", "sparsity": -0.1}]}, "sparsity"),
        ({"steps": [{"pass": "magnitude", "sparsity": 0.5, "granularity": "column"}]}, "granularity"),
        ({"steps": [{"pass": "nm", "n": 4, "m": 2}]}, "N must not exceed M"),
        ({"steps": [{"pass": "block", "sparsity": 0.5, "block": [0, 4]}]}, "block"),
        ({"steps": [{"pass": "lowrank"}]}, "exactly one of"),
        (
            {"steps": [{"pass": "magnitude", "sparsity": 0.5, "targets": ["rol:ffn.*"]}]},
            "bad selector 'rol:ffn.\\*'",
        ),
    ],
)
def test_recipe_errors_name_the_problem(recipe, message):
    with pytest.raises(sg.RecipeError, match=message):
        sg.Recipe.load(recipe)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(sg.RecipeError, match="recipe file not found"):
        sg.Recipe.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("steps: [\n")
    with pytest.raises(sg.RecipeError, match="bad.yaml: not valid YAML"):
        sg.Recipe.load(tmp_path / "bad.yaml")
