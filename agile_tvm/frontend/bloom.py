"""BLOOM decoder (ALiBi, fused query_key_value, embedding LayerNorm, tanh-GELU MLP, tied LM head) as Relax."""

from __future__ import annotations

import math

import numpy as np
from tvm import relax

from agile_tvm.frontend.graph import R, GraphBuilder


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The per-head ALiBi slopes exactly as Hugging Face BLOOM computes them (float32 powers)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = np.float32(2 ** (-(2 ** -(math.log2(closest) - 3))))
    slopes = [np.float32(base ** p) for p in range(1, 1 + closest)]
    if closest != num_heads:
        extra = np.float32(2 ** (-(2 ** -(math.log2(2 * closest) - 3))))
        rest = min(closest, num_heads - closest)
        slopes += [np.float32(extra ** p) for p in range(1, 1 + 2 * rest, 2)]
    return np.array(slopes, dtype=np.float32)


class Bloom:
    def __init__(self, config: dict):
        self.config = config
        self.hidden = int(config.get("hidden_size") or config.get("n_embed"))
        self.num_layers = int(config.get("n_layer") or config.get("num_hidden_layers"))
        self.heads = int(config.get("n_head") or config.get("num_attention_heads"))
        self.num_kv_heads = self.heads
        self.head_dim = self.hidden // self.heads
        self.vocab = int(config["vocab_size"])
        self.eps = float(config.get("layer_norm_epsilon", 1e-5))
        self.residual_post_ln = bool(config.get("apply_residual_connection_post_layernorm", False))

    def kv_dtype(self, ckpt) -> str:
        return "int8" if ckpt.attention else "float32"

    def gelu(self, g: GraphBuilder, x):
        """x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 * x * x))), HF's bloom_gelu_forward."""
        c = lambda v: relax.const(v, "float32")  # noqa: E731
        inner = R.multiply(R.multiply(c(0.79788456), x), R.add(c(1.0), R.multiply(R.multiply(c(0.044715), x), x)))
        return g.emit(R.multiply(R.multiply(x, c(0.5)), R.add(c(1.0), R.tanh(inner))))

    def emit(self, g: GraphBuilder, ids, pos, caches, last_only: bool):
        H, D = self.heads, self.head_dim
        slopes = alibi_slopes(H)
        head, tied = g.head_weight("transformer.word_embeddings.weight")
        x = g.embed(ids, "transformer.word_embeddings.weight", tied_head=tied)
        x = g.layer_norm(x, "transformer.word_embeddings_layernorm", self.eps)
        new_caches = []
        for i in range(self.num_layers):
            p = f"transformer.h.{i}"
            (x,) = g.begin_layer(i, x)
            n = g.n
            h = g.layer_norm(x, f"{p}.input_layernorm", self.eps)
            residual = h if self.residual_post_ln else x
            fused = g.linear(h, f"{p}.self_attention.query_key_value", self.hidden, 3 * self.hidden)
            fused = g.emit(R.reshape(fused, [n, H, 3, D]))
            q, k, v = (g.emit(R.reshape(R.strided_slice(fused, axes=[2], begin=[j], end=[j + 1]), [n, H, D]))
                       for j in range(3))
            if g.last_row_only(last_only, i, self.num_layers):
                q, residual = g.keep_last_row(q, residual)
            attn, cache = g.attention(q, k, v, f"{p}.self_attention", H, H, D, caches[i] if caches else None,
                                      slopes=slopes)
            new_caches.append(cache)
            x = g.emit(R.add(residual, g.linear(attn, f"{p}.self_attention.dense", self.hidden, self.hidden)))
            h = g.layer_norm(x, f"{p}.post_attention_layernorm", self.eps)
            residual = h if self.residual_post_ln else x
            h = self.gelu(g, g.linear(h, f"{p}.mlp.dense_h_to_4h", self.hidden, 4 * self.hidden))
            x = g.emit(R.add(residual, g.linear(h, f"{p}.mlp.dense_4h_to_h", 4 * self.hidden, self.hidden)))
        x = g.layer_norm(g.end_layers(x), "transformer.ln_f", self.eps)
        return g.lm_head(x, self.hidden, self.vocab, head, last_only), new_caches
