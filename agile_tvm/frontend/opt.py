"""OPT decoder (learned positions with offset 2, pre/post LayerNorm, ReLU MLP, tied LM head) as Relax."""

from __future__ import annotations

from tvm import relax

from agile_tvm.errors import UserError
from agile_tvm.frontend.graph import R, GraphBuilder


class Opt:
    POSITION_OFFSET = 2  # Hugging Face's OPTLearnedPositionalEmbedding adds 2 to every position

    def __init__(self, config: dict):
        self.config = config
        self.hidden = int(config["hidden_size"])
        self.num_layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.num_kv_heads = self.heads
        self.head_dim = self.hidden // self.heads
        self.ffn = int(config["ffn_dim"])
        self.vocab = int(config["vocab_size"])
        self.proj_dim = int(config.get("word_embed_proj_dim") or self.hidden)
        self.pre_norm = bool(config.get("do_layer_norm_before", True))
        self.act = config.get("activation_function", "relu")
        if self.act not in ("relu", "gelu"):
            raise UserError(f"OPT activation {self.act!r} is not supported by the frontend (relu, gelu)")
        if not config.get("layer_norm_elementwise_affine", True):
            raise UserError("OPT without affine LayerNorm is not supported by the frontend")

    def kv_dtype(self, ckpt) -> str:
        return "int8" if ckpt.attention else "float32"

    def emit(self, g: GraphBuilder, ids, pos, caches, last_only: bool):
        H, D = self.heads, self.head_dim
        eps = 1e-5
        head, tied = g.head_weight("model.decoder.embed_tokens.weight")
        x = g.embed(ids, "model.decoder.embed_tokens.weight", tied_head=tied and self.proj_dim == self.hidden)
        if self.proj_dim != self.hidden:
            x = g.linear(x, "model.decoder.project_in", self.proj_dim, self.hidden)
        pos2 = g.emit(R.add(pos, relax.const(self.POSITION_OFFSET, "int32")))
        x = g.emit(R.add(x, R.take(g.w("model.decoder.embed_positions.weight"), pos2, axis=0)))
        new_caches = []
        for i in range(self.num_layers):
            p = f"model.decoder.layers.{i}"
            (x,) = g.begin_layer(i, x)
            n = g.n
            h = g.layer_norm(x, f"{p}.self_attn_layer_norm", eps) if self.pre_norm else x
            qkv = g.linears(h, [f"{p}.self_attn.{t}_proj" for t in "qkv"], self.hidden, [self.hidden] * 3)
            q, k, v = (g.emit(R.reshape(t, [n, H, D])) for t in qkv)
            if g.last_row_only(last_only, i, self.num_layers):
                q, x = g.keep_last_row(q, x)
            attn, cache = g.attention(q, k, v, f"{p}.self_attn", H, H, D, caches[i] if caches else None)
            new_caches.append(cache)
            x = g.emit(R.add(x, g.linear(attn, f"{p}.self_attn.out_proj", self.hidden, self.hidden)))
            if not self.pre_norm:
                x = g.layer_norm(x, f"{p}.self_attn_layer_norm", eps)
            h = g.layer_norm(x, f"{p}.final_layer_norm", eps) if self.pre_norm else x
            h = g.linear(h, f"{p}.fc1", self.hidden, self.ffn)
            h = g.emit(R.nn.relu(h) if self.act == "relu" else R.nn.gelu(h))
            x = g.emit(R.add(x, g.linear(h, f"{p}.fc2", self.ffn, self.hidden)))
            if not self.pre_norm:
                x = g.layer_norm(x, f"{p}.final_layer_norm", eps)
        x = g.end_layers(x)
        if g.has("model.decoder.final_layer_norm.weight"):
            x = g.layer_norm(x, "model.decoder.final_layer_norm", eps)
        if self.proj_dim != self.hidden:
            x = g.linear(x, "model.decoder.project_out", self.hidden, self.proj_dim)
        return g.lm_head(x, self.proj_dim, self.vocab, head, last_only), new_caches
