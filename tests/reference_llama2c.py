"""Independent numpy forward pass of a llama2.c checkpoint, written like run.c's ``forward``.

Token by token with a KV cache, in float64, straight from the (out, in) checkpoint arrays: it shares
no code with the ONNX exporter, so the two check each other.
"""

from __future__ import annotations

import numpy as np


def _rmsnorm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    ss = np.dot(x, x) / x.size + 1e-5
    return w * (x / np.sqrt(ss))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_logits(config, weights: dict[str, np.ndarray], tokens) -> np.ndarray:
    """Logits [T, vocab] (float64) of ``tokens`` (1-D ids), position t seeing tokens 0..t."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    dim, hs = config.dim, config.dim // config.n_heads
    n_heads, kv_mul = config.n_heads, config.n_heads // config.n_kv_heads
    kv_dim = config.n_kv_heads * hs
    n = len(tokens)
    key_cache = np.zeros((config.n_layers, n, kv_dim))
    value_cache = np.zeros((config.n_layers, n, kv_dim))
    out = np.zeros((n, config.vocab_size))
    for pos, token in enumerate(tokens):
        x = w["token_embedding"][int(token)].copy()
        fcr = w["freq_cis_real"][pos]
        fci = w["freq_cis_imag"][pos]
        for layer in range(config.n_layers):
            xb = _rmsnorm(x, w["rms_att"][layer])
            q = w["wq"][layer] @ xb
            k = w["wk"][layer] @ xb
            v = w["wv"][layer] @ xb
            # RoPE as run.c: rotate (i, i+1) by the angle of frequency (i % head_size) / 2
            for i in range(0, dim, 2):
                fr, fi = fcr[(i % hs) // 2], fci[(i % hs) // 2]
                q0, q1 = q[i], q[i + 1]
                q[i], q[i + 1] = q0 * fr - q1 * fi, q0 * fi + q1 * fr
                if i < kv_dim:
                    k0, k1 = k[i], k[i + 1]
                    k[i], k[i + 1] = k0 * fr - k1 * fi, k0 * fi + k1 * fr
            key_cache[layer, pos] = k
            value_cache[layer, pos] = v
            xb = np.zeros(dim)
            for h in range(n_heads):
                qh = q[h * hs : (h + 1) * hs]
                kv = (h // kv_mul) * hs
                att = _softmax(key_cache[layer, : pos + 1, kv : kv + hs] @ qh / np.sqrt(hs))
                xb[h * hs : (h + 1) * hs] = att @ value_cache[layer, : pos + 1, kv : kv + hs]
            x = x + w["wo"][layer] @ xb
            xb = _rmsnorm(x, w["rms_ffn"][layer])
            h1 = w["w1"][layer] @ xb
            h3 = w["w3"][layer] @ xb
            h1 = h1 * (1.0 / (1.0 + np.exp(-h1))) * h3
            x = x + w["w2"][layer] @ h1
        x = _rmsnorm(x, w["rms_final"])
        out[pos] = w["wcls"] @ x
    return out
