"""LLaMA decoder (GQA, RoPE, SwiGLU, RMSNorm, tied or separate LM head) as Relax, from a quantized checkpoint."""

from __future__ import annotations

import numpy as np
from tvm import relax

from agile_tvm.frontend import tir_ops
from agile_tvm.frontend.graph import R, GraphBuilder


def rope_tables(head_dim: int, theta: float, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_len, head_dim] as HF LLaMA computes them (float32 inv_freq, cat(freqs, freqs))."""
    inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))).astype(
        np.float32)
    freqs = np.arange(max_len, dtype=np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=1).astype(np.float32)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


class Llama:
    def __init__(self, config: dict):
        self.config = config
        self.hidden = int(config["hidden_size"])
        self.num_layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.num_kv_heads = int(config.get("num_key_value_heads") or self.heads)
        self.head_dim = int(config.get("head_dim") or self.hidden // self.heads)
        self.inter = int(config["intermediate_size"])
        self.vocab = int(config["vocab_size"])
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        # transformers >= 5 writes `rope_parameters`; older configs have `rope_theta` / `rope_scaling`
        rp = config.get("rope_parameters") or {}
        self.theta = float(rp.get("rope_theta", config.get("rope_theta", 10000.0)))
        rs = config.get("rope_scaling") or (rp if rp.get("rope_type") not in (None, "default") else None)
        if rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
            from agile_tvm.errors import UserError

            raise UserError(f"rope_scaling {rs} is not supported by the frontend (only default RoPE)")

    def kv_dtype(self, ckpt) -> str:
        return "int8" if ckpt.attention else "float32"

    def emit(self, g: GraphBuilder, ids, pos, caches, last_only: bool):
        """The decoder. Kernels where they apply: RoPE reads the tables at each row's position (`g.rope_at`, no
        per-row cos/sin copies to gather when pruning), and each residual add also norms its sum for what comes next
        (`g.add_rms_norm`: the post-attention norm; without pruning also the next layer's input norm, or the final
        norm)."""
        H, KVH, D = self.heads, self.num_kv_heads, self.head_dim
        cos_t, sin_t = rope_tables(D, self.theta, g.max_seq_len)
        rope_kernel = D % (2 * tir_ops.ROPE_LANES) == 0
        if rope_kernel:
            g.w("rope.cos", cos_t)
            g.w("rope.sin", sin_t)
            tables = ()
        else:
            tables = (g.emit(R.reshape(R.take(g.w("rope.cos", cos_t), pos, axis=0), [g.n, 1, D])),
                      g.emit(R.reshape(R.take(g.w("rope.sin", sin_t), pos, axis=0), [g.n, 1, D])))
        head, tied = g.head_weight("model.embed_tokens.weight")
        x = g.embed(ids, "model.embed_tokens.weight", tied_head=tied)
        new_caches = []
        h = None  # the input norm of the next layer, when the previous residual add computed it
        for i in range(self.num_layers):
            p = f"model.layers.{i}"
            x, *tables = g.begin_layer(i, x, *tables)
            n = g.n
            if h is None:
                h = g.rms_norm(x, f"{p}.input_layernorm.weight", self.eps)
            q, k, v = g.linears(h, [f"{p}.self_attn.{t}_proj" for t in "qkv"], self.hidden, [H * D, KVH * D, KVH * D])
            if rope_kernel:
                rows = g.row_positions(pos)
                q = g.rope_at(q, "rope.cos", "rope.sin", rows, H, D)
                k = g.rope_at(k, "rope.cos", "rope.sin", rows, KVH, D)
            else:
                q = g.rope(g.emit(R.reshape(q, [n, H, D])), *tables, H, D)
                k = g.rope(g.emit(R.reshape(k, [n, KVH, D])), *tables, KVH, D)
            v = g.emit(R.reshape(v, [n, KVH, D]))
            g.tap(f"{p}:q", q)
            g.tap(f"{p}:k", k)
            g.tap(f"{p}:v", v)
            if g.last_row_only(last_only, i, self.num_layers):
                q, x = g.keep_last_row(q, x)
            attn, cache = g.attention(q, k, v, f"{p}.self_attn", H, KVH, D, caches[i] if caches else None)
            new_caches.append(cache)
            o = g.linear(attn, f"{p}.self_attn.o_proj", H * D, self.hidden)
            x, h = g.add_rms_norm(x, o, f"{p}.post_attention_layernorm.weight", self.eps)
            gate, up = g.linears(h, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], self.hidden, [self.inter] * 2)
            if self.inter % 8 == 0:
                gv = g.tir(f"swiglu_{self.inter}{g.row_suffix}", tir_ops.swiglu(self.inter, parallel=g.row_parallel))
                act = g.emit(relax.call_tir(gv, [gate, up], relax.TensorType([g.n, self.inter], "float32")))
            else:
                act = g.emit(R.multiply(R.nn.silu(gate), up))
            down = g.linear(act, f"{p}.mlp.down_proj", self.inter, self.hidden)
            g.tap(f"{p}:mlp_in", h)
            if g.fuses_next_norm:
                last = i + 1 == self.num_layers
                next_norm = "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
                x, h = g.add_rms_norm(x, down, next_norm, self.eps)
            else:
                x, h = g.emit(R.add(x, down)), None
            g.tap(f"{p}:attn_out", attn)
            g.tap(f"{p}:out", x)
        if h is None:
            h = g.rms_norm(g.end_layers(x), "model.norm.weight", self.eps)
        return g.lm_head(h, self.hidden, self.vocab, head, last_only), new_caches
