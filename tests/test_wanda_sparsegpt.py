"""Calibrated pruning: `wanda_mask` and `sparsegpt_prune` on hand-made cases, the passes on
hand-built graphs (masks, written weights, chains, errors), and the reference checks on
stories260K against independent torch implementations of both papers' algorithms."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import sparsegraph as sg
from sparsegraph.calibration import Calibration
from sparsegraph.eval.perplexity import load_stories, perplexity, token_windows
from sparsegraph.eval.tokenizer import Llama2cTokenizer
from sparsegraph.models.llama2c import read_checkpoint
from sparsegraph.passes.analysis.sparsifiable import SparsifiableOps
from sparsegraph.passes.rewrite.magnitude import magnitude_mask
from sparsegraph.passes.rewrite.nm import nm_mask
from sparsegraph.passes.rewrite.sparsegpt import sparsegpt_prune
from sparsegraph.passes.rewrite.wanda import wanda_mask

import graphs as g
from paths import EXAMPLES, STORIES

TEXT = EXAMPLES / "data" / "tinystories_valid.txt"
TOKENIZER = EXAMPLES / "stories260K" / "tok512.bin"
CHECKPOINT = EXAMPLES / "stories260K" / "stories260K.bin"


def _nm_ok(keep: np.ndarray, n: int, m: int) -> bool:
    k = keep.shape[1]
    padded = np.pad(keep, ((0, 0), (0, (-k) % m)))
    return bool((padded.reshape(keep.shape[0], -1, m).sum(-1) <= n).all())


# ================================================================== wanda_mask by hand
def test_wanda_mask_scores_weight_times_input_norm():
    w = np.array([[4.0, -1.0, 2.0, 1.0], [1.0, 3.0, -1.0, 2.0]], np.float32)
    x_norm = np.array([0.1, 1.0, 1.0, 4.0])
    # scores: [[0.4, 1, 2, 4], [0.1, 3, 1, 8]]: the biggest weight of row 0 goes
    np.testing.assert_array_equal(wanda_mask(w, x_norm, 0.5), [[0, 0, 1, 1], [0, 1, 0, 1]])
    np.testing.assert_array_equal(
        wanda_mask(w, x_norm, 0.5, granularity="tensor"), [[0, 0, 1, 1], [0, 1, 0, 1]]
    )
    np.testing.assert_array_equal(
        wanda_mask(w, x_norm, 0.25, granularity="tensor"), [[0, 1, 1, 1], [0, 1, 1, 1]]
    )
    np.testing.assert_array_equal(wanda_mask(w, x_norm, n=1, m=2), [[0, 1, 0, 1], [0, 1, 0, 1]])


def test_wanda_mask_with_flat_norms_is_magnitude_pruning():
    w = np.random.default_rng(0).standard_normal((16, 24)).astype(np.float32)
    ones = np.ones(24)
    np.testing.assert_array_equal(wanda_mask(w, ones, 0.6), magnitude_mask(w, 0.6, "row"))
    np.testing.assert_array_equal(wanda_mask(w, ones, 0.6, granularity="tensor"), magnitude_mask(w, 0.6))
    np.testing.assert_array_equal(wanda_mask(w, 3 * ones, n=2, m=4), nm_mask(w, 2, 4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "either sparsity"),
        ({"sparsity": 0.5, "n": 2, "m": 4}, "either sparsity"),
        ({"n": 3, "m": 2}, "0 < N <= M"),
        ({"sparsity": 1.0}, "[0, 1)"),
    ],
)
def test_wanda_mask_rejects_bad_targets(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        wanda_mask(np.ones((2, 4)), np.ones(4), **kwargs)


# ============================================================ sparsegpt_prune by hand
def _correlated(rows=512, k=32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, k)) @ rng.standard_normal((k, k)) + rng.standard_normal(k)


def test_sparsegpt_with_a_diagonal_hessian_is_magnitude_pruning_without_updates():
    w = np.random.default_rng(1).standard_normal((8, 16))
    new_w, info = sparsegpt_prune(w, 3.0 * np.eye(16), sparsity=0.5, blocksize=16)
    np.testing.assert_array_equal(info["mask"], magnitude_mask(w, 0.5))  # one block: the whole tensor
    np.testing.assert_allclose(new_w, w * info["mask"], rtol=1e-12)
    new_w, info = sparsegpt_prune(w, np.eye(16), n=2, m=4, blocksize=6)  # rounded down to 4
    np.testing.assert_array_equal(info["mask"], nm_mask(w, 2, 4))
    np.testing.assert_allclose(new_w, w * info["mask"], rtol=1e-12)


@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"n": 2, "m": 4}])
def test_sparsegpt_reconstructs_better_than_the_mask_alone(target):
    x = _correlated()
    w = np.random.default_rng(2).standard_normal((24, 32)).astype(np.float32)
    new_w, info = sparsegpt_prune(w, 2 * x.T @ x, blocksize=8, **target)
    assert new_w.dtype == np.float32
    keep = info["mask"]
    assert not np.any(new_w[~keep]) and np.all(new_w[keep] != 0)
    if "n" in target:
        assert _nm_ok(keep, 2, 4) and keep.sum() == w.size // 2
    else:  # exactly floor(p * rows * block) pruned in every block of 8 columns
        pruned = (~keep).reshape(24, 4, 8).sum(axis=(0, 2))
        assert (pruned == math.floor(target["sparsity"] * 24 * 8)).all()
    err_obs = np.linalg.norm(x @ (w - new_w).T)
    err_mask = np.linalg.norm(x @ (w * ~keep).T)
    wanda_keep = wanda_mask(w, np.linalg.norm(x, axis=0), **target)
    err_wanda = np.linalg.norm(x @ (w * ~wanda_keep).T)
    assert err_obs < 0.95 * min(err_mask, err_wanda)


def test_sparsegpt_dead_inputs_are_zeroed():
    x = _correlated(k=12)
    x[:, [3, 7]] = 0
    w = np.random.default_rng(3).standard_normal((6, 12))
    new_w, info = sparsegpt_prune(w, 2 * x.T @ x, sparsity=0.25)
    assert info["dead_inputs"] == 2 and not new_w[:, [3, 7]].any() and not info["mask"][:, [3, 7]].any()
    assert (~info["mask"]).sum() == math.floor(0.25 * w.size)  # the dead columns count as pruned


def test_sparsegpt_retries_dampening_on_cholesky_failure():
    x = _correlated(rows=64, k=8)
    x[:, 5] = x[:, 4]  # rank-deficient: H singular, Cholesky fails without dampening
    h = 2 * x.T @ x
    w = np.random.default_rng(4).standard_normal((4, 8))
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(np.round(h))  # integer-exact singular H: not positive definite
    new_w, info = sparsegpt_prune(w, np.round(h), sparsity=0.5, damp=0.0)
    assert info["damp_retries"] >= 1 and info["damp"] >= 1e-6 and np.all(np.isfinite(new_w))
    indefinite = h - 2 * np.linalg.eigvalsh(h).max() * np.eye(8) / 3  # negative eigenvalues
    new_w, info = sparsegpt_prune(w, indefinite, sparsity=0.5, damp=0.01)
    assert info["damp_retries"] >= 2 and np.all(np.isfinite(new_w))
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt_prune(w, np.full((8, 8), np.nan), sparsity=0.5)


# ================================================================ passes on small graphs
def _batches(x: np.ndarray, size: int = 4):
    return [{"X": x[i : i + size]} for i in range(0, len(x), size)]


def _run(proto, steps, calib=None):
    model = sg.Model.from_proto(proto)
    ctx = sg.PassContext()
    if calib is not None:
        ctx.extras["calibration"] = calib
    ctx = sg.PassManager(steps).run(model, ctx)
    return model, ctx


def _weights(model) -> dict[str, np.ndarray]:
    return {op.name: op.weight.matrix() for op in sg.PassContext().get(SparsifiableOps, model)}


def test_wanda_pass_masks_with_input_norms():
    proto = g.matmul_chain(dims=(8, 12, 6), batch=4)
    x = np.random.default_rng(5).standard_normal((16, 8)).astype(np.float32) * np.arange(1, 9)
    dense = _weights(sg.Model.from_proto(proto))
    model, ctx = _run(proto, [sg.get_pass("wanda")(sparsity=0.5)], Calibration(_batches(x)))
    h = x @ g.initializer(proto, "W0")
    for name, inp in (("mm0", x), ("mm1", h)):
        expected = dense[name] * wanda_mask(dense[name], np.linalg.norm(inp.astype(np.float64), axis=0), 0.5)
        np.testing.assert_array_equal(_weights(model)[name], expected)
    changes = ctx.history[-1][1].changes
    assert [c.op for c in changes] == ["mm0", "mm1"] and changes[0].detail["sparsity_after"] == 0.5


@pytest.mark.parametrize("build", [g.matmul_transposed, g.matmul_cast, g.matmul_constant_node])
def test_sparsegpt_pass_writes_reconstructed_weights_through_chains(build):
    proto = build(k=8, n=6, batch=8)
    x = _correlated(rows=32, k=8).astype(np.float32)
    w = _weights(sg.Model.from_proto(proto))["mm"]
    step = sg.get_pass("sparsegpt")(sparsity=0.5, targets=["op:*"])  # one op: the head by default
    model, ctx = _run(proto, [step], Calibration(_batches(x, 8)))
    expected, _ = sparsegpt_prune(w, 2 * x.astype(np.float64).T @ x / 32, sparsity=0.5)
    fp16 = build is g.matmul_cast  # the stored weight stays float16
    assert (g.initializer(model.to_proto(), "W").dtype == np.float16) == fp16
    np.testing.assert_allclose(_weights(model)["mm"], expected, rtol=1e-3 if fp16 else 1e-6)
    assert (_weights(model)["mm"] == 0).mean() == 0.5
    got = g.run_ort(model.to_proto(), {"X": x[:8]})[0]  # the graph computes X @ new_w.T
    np.testing.assert_allclose(got, x[:8] @ _weights(model)["mm"].T.astype(np.float32), rtol=1e-4, atol=1e-4)
    assert ctx.history[-1][1].changes[0].detail["damp_retries"] == 0


def test_sparsegpt_rejects_quantized_weights_and_skips_them_by_default():
    quantized = g.matmul_dequant(k=8, n=6, batch=3)  # Y = X @ DQ(W): followed by a plain MatMul
    rng = np.random.default_rng(6)
    nodes = [*quantized.graph.node[:-1], onnx.helper.make_node("MatMul", ["X", "Wd"], ["h"], name="mm")]
    nodes.append(onnx.helper.make_node("MatMul", ["h", "W1"], ["Y"], name="mm1"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    inits["W1"] = rng.standard_normal((6, 5)).astype(np.float32)
    y = onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [3, 5])
    proto = g.make_model(nodes, list(quantized.graph.input), [y], inits)
    calib = Calibration(_batches(rng.standard_normal((3, 8)).astype(np.float32), 3))
    with pytest.raises(sg.UnsupportedOpError, match="cannot rewrite op 'mm': quantized"):
        _run(proto, [sg.get_pass("sparsegpt")(sparsity=0.5, targets=["name:mm"])], calib)
    _, ctx = _run(proto, [sg.get_pass("sparsegpt")(sparsity=0.5)], calib)
    result = ctx.history[-1][1]
    assert [c.op for c in result.changes] == ["mm1"] and "left 'mm' untouched: quantized" in result.warnings[
        0
    ]
    _, ctx = _run(proto, [sg.get_pass("wanda")(sparsity=0.5)], calib)  # masks work on quantized weights
    assert ctx.history[-1][1].changes[0].op == "mm"


def test_sparsegpt_pass_reports_dampening_retries():
    proto = g.matmul_chain(dims=(8, 6), batch=4)
    x = np.round(_correlated(rows=16, k=8) * 4).astype(np.float32)
    x[:, 5] = x[:, 4]  # rank-deficient Hessian; damp 0 makes Cholesky fail
    step = sg.get_pass("sparsegpt")(sparsity=0.5, damp=0.0, targets=["op:*"])
    _, ctx = _run(proto, [step], Calibration(_batches(x)))
    result = ctx.history[-1][1]
    assert result.changes[0].detail["damp_retries"] >= 1
    assert "not positive definite" in result.warnings[0] and "mm0" in result.warnings[0]


def test_missing_calibration_is_a_recipe_error_naming_the_pass(tmp_path):
    proto = g.matmul_chain()
    for name in ("wanda", "sparsegpt"):
        with pytest.raises(sg.RecipeError, match=f"pass '{name}' needs calibration data: pass --calib"):
            _run(proto, [sg.get_pass(name)(sparsity=0.5)])
    with pytest.raises(sg.RecipeError, match="pass 'wanda' needs calibration data"):
        sg.compile_model(STORIES, EXAMPLES / "recipes" / "wanda50.yaml", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(sg.RecipeError, match="either sparsity"):
        sg.Recipe.load({"steps": [{"pass": "sparsegpt", "sparsity": 0.5, "n": 2, "m": 4}]})
    with pytest.raises(sg.RecipeError, match="unknown key 'granularity'"):
        sg.Recipe.load({"steps": [{"pass": "sparsegpt", "sparsity": 0.5, "granularity": "row"}]})


# ============================================================ reference checks: stories260K
class TorchLlama:
    """Independent torch (float64) forward of a llama2.c checkpoint: RMSNorm, RoPE on
    interleaved pairs, grouped-query causal attention, SwiGLU; `linear` inputs reported to
    `capture(kind, layer, x)`. Weights are torch's (out, in) `Linear.weight` layout."""

    LINEARS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")

    def __init__(self, path):
        self.cfg, arrays = read_checkpoint(path)
        self.w = {k: torch.tensor(np.asarray(v), dtype=torch.float64) for k, v in arrays.items()}
        self.linear = {(k, i): self.w[k][i].clone() for k in self.LINEARS for i in range(self.cfg.n_layers)}

    @staticmethod
    def _rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def _rope(self, x, t):  # x [B, T, heads, hs]: rotate pairs (2i, 2i+1) by angle i
        fr, fi = self.w["freq_cis_real"][:t, None, :], self.w["freq_cis_imag"][:t, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * fr - b * fi, a * fi + b * fr), dim=-1).flatten(-2)

    def layer(self, x, i, capture=None):
        c = self.cfg
        B, T, _ = x.shape
        hs, lin = c.dim // c.n_heads, self.linear

        def f(kind, inp):
            if capture is not None:
                capture(kind, i, inp)
            return inp @ lin[kind, i].T

        h = self._rms(x, self.w["rms_att"][i])
        q = self._rope(f("wq", h).view(B, T, c.n_heads, hs), T).transpose(1, 2)
        k = self._rope(f("wk", h).view(B, T, c.n_kv_heads, hs), T).transpose(1, 2)
        v = f("wv", h).view(B, T, c.n_kv_heads, hs).transpose(1, 2)
        rep = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(qkᵀ/√hs)v
        ctx = ctx.transpose(1, 2).reshape(B, T, c.dim)
        x = x + f("wo", ctx)
        h = self._rms(x, self.w["rms_ffn"][i])
        return x + f("w2", torch.nn.functional.silu(f("w1", h)) * f("w3", h))

    def embed(self, tokens):
        return self.w["token_embedding"][torch.as_tensor(tokens)]

    def logits(self, tokens):
        x = self.embed(tokens)
        for i in range(self.cfg.n_layers):
            x = self.layer(x, i)
        return self._rms(x, self.w["rms_final"]) @ self.w["wcls"].T

    def perplexity(self, windows: np.ndarray) -> float:
        """exp(mean NLL) of `windows[n, T+1]`: logits at t score token t+1."""
        logp = self.logits(windows[:, :-1]).log_softmax(-1)
        return math.exp(-float(logp.gather(-1, torch.as_tensor(windows[:, 1:, None])).mean()))


def reference_prune(ref: TorchLlama, tokens: np.ndarray, prune, sequential: bool) -> None:
    """Prune `ref.linear` in place, layer by layer as both papers' reference code does: the
    inputs of every linear of layer i are captured on the unpruned layer i, the layer is
    pruned with `prune(W, inputs [rows, K])`, and layer i+1 sees the pruned layer's output
    (`sequential`) or the dense model's (`not sequential`)."""
    x = ref.embed(tokens)
    dense_x = x
    for i in range(ref.cfg.n_layers):
        seen = {}

        def capture(kind, _, inp, seen=seen):
            seen.setdefault(kind, inp.reshape(-1, inp.shape[-1]))

        ref.layer(x, i, capture)
        dense_next = ref.layer(dense_x, i) if not sequential else None
        for kind, inp in seen.items():
            ref.linear[kind, i] = prune(ref.linear[kind, i], inp)
        x = ref.layer(x, i) if sequential else dense_next
        dense_x = x


def ref_wanda(sparsity=None, n=None, m=None):
    """Wanda, Sun et al. 2023, sec. 3: score |W_ij| * ||X_j||_2, drop the lowest per output
    row (unstructured) or the m - n lowest of every m consecutive inputs (N:M)."""

    def prune(W, X):
        score = W.abs() * X.norm(dim=0)[None, :]
        drop = torch.zeros_like(W, dtype=torch.bool)
        if sparsity is not None:
            order = torch.sort(score, dim=1, stable=True).indices[:, : int(W.shape[1] * sparsity)]
            drop.scatter_(1, order, True)
        else:
            for j in range(0, W.shape[1], m):
                group = score[:, j : j + m]
                drop[:, j : j + m].scatter_(
                    1, torch.topk(group, group.shape[1] - n, largest=False).indices, True
                )
        return W.masked_fill(drop, 0.0)

    return prune


def ref_sparsegpt(sparsity=None, n=None, m=None, blocksize=128, percdamp=0.01):
    """SparseGPT, Frantar & Alistarh 2023, Algorithm 1 with H = 2XᵀX/rows, λ = percdamp·mean diag:
    Hinv = Cholesky(H⁻¹)ᵀ; per block of B columns pick the mask (lowest w²/[Hinv]_cc² of p % of
    the block, or per M group for N:M), then for each column q = w·mask, err = (w - q)/Hinv_cc,
    update the rest of the block by err·Hinv_c,c:, and the later blocks at once."""

    def prune(W, X):
        W = W.clone()
        H = 2 * X.T @ X / X.shape[0]
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        H = H + percdamp * torch.diag(H).mean() * torch.eye(len(H), dtype=H.dtype)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        cols = W.shape[1]
        for b0 in range(0, cols, blocksize):
            b1 = min(b0 + blocksize, cols)
            W1, Hb = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
            d = torch.diag(Hb)
            mask = torch.zeros_like(W1, dtype=torch.bool)  # True = pruned
            if sparsity is not None:
                score = (W1**2 / d**2).flatten()
                mask.view(-1)[torch.sort(score, stable=True).indices[: int(score.numel() * sparsity)]] = True
            E = torch.zeros_like(W1)
            for c in range(b1 - b0):
                if sparsity is None and c % m == 0:
                    score = W1[:, c : c + m] ** 2 / d[c : c + m] ** 2
                    mask[:, c : c + m].scatter_(
                        1, torch.topk(score, score.shape[1] - n, largest=False).indices, True
                    )
                q = W1[:, c].masked_fill(mask[:, c], 0.0)
                E[:, c] = (W1[:, c] - q) / d[c]
                W1[:, c:] -= E[:, c : c + 1] @ Hb[c : c + 1, c:]
                W1[:, c] = q
            W[:, b0:b1] = W1
            W[:, b1:] -= E @ Hinv[b0:b1, b1:]
        return W

    return prune


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The reference runs beside onnxruntime on a small shared machine: no thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stories():
    """Model, calibration (128 windows of 128 tokens from the first half of the stories),
    calibration tokens, held-out windows (second half), and the checkpoint's linear layers."""
    tok = Llama2cTokenizer(TOKENIZER)
    docs = load_stories(TEXT)
    model = sg.Model.load(STORIES)
    calib = Calibration.from_text(docs[: len(docs) // 2], tok, model, samples=128, seqlen=128, seed=0)
    tokens = np.concatenate([b["tokens"] for b in calib.batches()])
    held_out = [w for w in token_windows(tok, docs[len(docs) // 2 :], seq_len=128) if len(w) == 129][:48]
    ref = TorchLlama(CHECKPOINT)
    where = {}  # ONNX op name -> (kind, layer), matched by weight content
    for op in sg.PassContext().get(SparsifiableOps, model):
        for key, w in ref.linear.items():
            if op.weight.matrix().shape == tuple(w.shape) and np.array_equal(op.weight.matrix(), w.numpy()):
                where[op.name] = key
    assert len(where) == 35
    return model, calib, tokens, held_out, where


def _pruned(stories, step, calib=None):
    model, full, *_ = stories
    calib = calib or full
    model = model.copy()
    ctx = sg.PassContext()
    ctx.extras["calibration"] = calib
    sg.PassManager([sg.get_pass(step.pop("pass"))(**step)]).run(model, ctx)
    return model


def _ort_perplexity(model, windows) -> float:
    sess = ort.InferenceSession(model.to_proto().SerializeToString(), providers=["CPUExecutionProvider"])
    return perplexity(sess, windows).ppl


def test_torch_reference_model_matches_the_onnx_export(stories):
    model, _, _, held_out, _ = stories
    ref = TorchLlama(CHECKPOINT)
    assert ref.perplexity(np.stack(held_out)) == pytest.approx(_ort_perplexity(model, held_out), rel=1e-4)


@pytest.mark.parametrize(
    "target, sequential",
    [
        ({"sparsity": 0.5}, True),
        ({"sparsity": 0.5}, False),
        ({"n": 2, "m": 4}, True),
        ({"sparsity": 0.7}, True),
    ],
)
def test_wanda_masks_equal_the_reference_on_every_layer(stories, target, sequential):
    _, _, tokens, _, where = stories
    ref = TorchLlama(CHECKPOINT)
    reference_prune(ref, tokens, ref_wanda(**target), sequential)
    pruned = _weights(_pruned(stories, {"pass": "wanda", "sequential": sequential, **target}))
    for name, key in where.items():
        np.testing.assert_array_equal(pruned[name] != 0, ref.linear[key].numpy() != 0, err_msg=name)


@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"n": 2, "m": 4}])
def test_sparsegpt_perplexity_within_one_percent_of_the_reference(stories, target):
    _, calib, tokens, held_out, _ = stories
    calib = Calibration(list(calib.batches())[:4])  # the first 32 windows, to keep the test fast
    ref = TorchLlama(CHECKPOINT)
    reference_prune(ref, tokens[:32], ref_sparsegpt(**target), sequential=True)
    step = {"pass": "sparsegpt", "sequential": True, **target}
    ours = _ort_perplexity(_pruned(stories, step, calib), held_out)
    theirs = ref.perplexity(np.stack(held_out))
    print(f"sparsegpt {target}: perplexity {ours:.4f}, reference {theirs:.4f}")
    assert ours == pytest.approx(theirs, rel=0.01), (ours, theirs)
