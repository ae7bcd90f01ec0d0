"""`QuantizedCausalLM`: the forward pass of a (quantized) LLaMA / OPT / BLOOM with token pruning.

It wraps the Hugging Face model (whose module tree, names and state_dict stay the checkpoint's) and runs its
submodules layer by layer: embeddings -> decoder blocks (norms and MLP activation of the original modules, linears
that may be QuantLinear, attention from `attention.py`) -> final norm -> LM head. Owning the layer loop is what
token pruning needs (gathering the kept rows before a block and scattering the result back, so a pruned token keeps
its last hidden state), and it is the same loop calibration drives one layer at a time.

`model(ids)` returns `(logits [B, L, V], kept_mask [B, L] bool)`; `last_token_sparsity` holds eq. 10 of the last
call. With the `fp` config and no pruning the logits equal Hugging Face's own forward (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from agile_tvm.quant import attention as qattn
from agile_tvm.quant.configs import AttnQuant, QuantConfig
from agile_tvm.quant.pruning import keep_count, select_tokens, token_sparsity


@dataclass
class Context:
    """What a block needs besides its input: the quant/calibration mode and position machinery."""

    attention: AttnQuant | None
    calibrating: bool = False
    rotary: object = None  # llama: callable (x, pos) -> (cos, sin)
    alibi_slopes: torch.Tensor | None = None  # bloom: [H]


@dataclass
class State:
    """Hidden states of all tokens plus the positions still processed (token pruning)."""

    h: torch.Tensor  # [B, L, D]
    kept: torch.Tensor  # [B, n] sorted positions
    scores: torch.Tensor | None = None  # [B, n] attention to the first token, from the last block
    counts: list = field(default_factory=list)


def linear_paths(model: nn.Module, arch: str) -> dict[str, str]:
    """Module path -> role ('qkv', 'o', 'up', 'down') of every linear that quantization replaces."""
    roles = {
        "llama": {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
                  "self_attn.o_proj": "o", "mlp.gate_proj": "up", "mlp.up_proj": "up", "mlp.down_proj": "down"},
        "opt": {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
                "self_attn.out_proj": "o", "fc1": "up", "fc2": "down"},
        "bloom": {"self_attention.query_key_value": "qkv", "self_attention.dense": "o",
                  "mlp.dense_h_to_4h": "up", "mlp.dense_4h_to_h": "down"},
    }[arch]
    out = {}
    prefix = layers_path(arch)
    for i in range(len(decoder_layers(model, arch))):
        for sub, role in roles.items():
            out[f"{prefix}.{i}.{sub}"] = role
    return out


def layers_path(arch: str) -> str:
    return {"llama": "model.layers", "opt": "model.decoder.layers", "bloom": "transformer.h"}[arch]


def attention_paths(model: nn.Module, arch: str) -> list[str]:
    sub = "self_attention" if arch == "bloom" else "self_attn"
    return [f"{layers_path(arch)}.{i}.{sub}" for i in range(len(decoder_layers(model, arch)))]


def decoder_layers(model: nn.Module, arch: str) -> nn.ModuleList:
    return model.get_submodule(layers_path(arch))


# ------------------------------------------------------------------------------------------- blocks
def llama_block(layer, x, pos, ctx):
    a, scores = qattn.llama_attention(layer.self_attn, layer.input_layernorm(x), pos, ctx)
    x = x + a
    return x + layer.mlp(layer.post_attention_layernorm(x)), scores


def opt_block(layer, x, pos, ctx):
    before = layer.do_layer_norm_before
    a, scores = qattn.opt_attention(layer.self_attn, layer.self_attn_layer_norm(x) if before else x, pos, ctx)
    x = x + a
    if not before:
        x = layer.self_attn_layer_norm(x)
    h = layer.final_layer_norm(x) if before else x
    x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
    if not before:
        x = layer.final_layer_norm(x)
    return x, scores


def bloom_block(layer, x, pos, ctx):
    post = layer.apply_residual_connection_post_layernorm
    ln = layer.input_layernorm(x)
    a, scores = qattn.bloom_attention(layer.self_attention, ln, pos, ctx)
    x = a + (ln if post else x)
    ln2 = layer.post_attention_layernorm(x)
    mlp = layer.mlp
    return mlp.dense_4h_to_h(mlp.gelu_impl(mlp.dense_h_to_4h(ln2))) + (ln2 if post else x), scores


BLOCKS = {"llama": llama_block, "opt": opt_block, "bloom": bloom_block}


class QuantizedCausalLM(nn.Module):
    """A causal LM whose forward follows the quantization config (attention quant points, token pruning)."""

    def __init__(self, hf_model: nn.Module, arch: str, config: QuantConfig):
        super().__init__()
        self.hf = hf_model
        self.arch = arch
        self.qconfig = config
        self.num_layers = len(decoder_layers(hf_model, arch))
        self.prune_layers = config.pruning.layers(self.num_layers)
        self.gamma = config.pruning.gamma(self.num_layers)
        self.last_token_sparsity = 0.0
        self.ctx = Context(attention=config.attention)
        if arch == "llama":
            rot = hf_model.model.rotary_emb
            self.ctx.rotary = lambda x, pos: rot(x, position_ids=pos)
        if arch == "bloom":
            from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

            self.ctx.alibi_slopes = _get_alibi_slopes(hf_model.config.n_head, torch.device("cpu"))

    @property
    def config(self):
        return self.hf.config

    # -------------------------------------------------------------- pieces (calibration drives these)
    def embed(self, ids: torch.Tensor) -> State:
        b, length = ids.shape
        pos = torch.arange(length).expand(b, length)
        if self.arch == "llama":
            h = self.hf.model.embed_tokens(ids)
        elif self.arch == "opt":
            dec = self.hf.model.decoder
            h = dec.embed_tokens(ids)
            if dec.project_in is not None:
                h = dec.project_in(h)
            h = h + nn.functional.embedding(pos + dec.embed_positions.offset, dec.embed_positions.weight)
        else:
            tr = self.hf.transformer
            h = tr.word_embeddings_layernorm(tr.word_embeddings(ids))
        return State(h=h, kept=pos.clone())

    def run_layer(self, i: int, st: State) -> State:
        length = st.h.shape[1]
        if i in self.prune_layers and st.scores is not None:
            st.kept = select_tokens(st.kept, st.scores, keep_count(st.kept.shape[1], self.gamma))
        full = st.kept.shape[1] == length
        idx = None if full else st.kept[:, :, None].expand(-1, -1, st.h.shape[2])
        x = st.h if full else torch.gather(st.h, 1, idx)
        y, st.scores = BLOCKS[self.arch](decoder_layers(self.hf, self.arch)[i], x, st.kept, self.ctx)
        st.h = y if full else st.h.scatter(1, idx, y)
        st.counts.append(st.kept.shape[1])
        return st

    def head(self, st: State) -> torch.Tensor:
        if self.arch == "llama":
            h = self.hf.model.norm(st.h)
        elif self.arch == "opt":
            dec = self.hf.model.decoder
            h = dec.final_layer_norm(st.h) if dec.final_layer_norm is not None else st.h
            if dec.project_out is not None:
                h = dec.project_out(h)
        else:
            h = self.hf.transformer.ln_f(st.h)
        return self.hf.lm_head(h)

    def kept_mask(self, st: State) -> torch.Tensor:
        mask = torch.zeros(st.h.shape[:2], dtype=torch.bool)
        return mask.scatter(1, st.kept, True)

    # -------------------------------------------------------------- forward
    @torch.no_grad()
    def forward(self, ids: torch.Tensor):
        st = self.embed(ids)
        for i in range(self.num_layers):
            st = self.run_layer(i, st)
        self.last_token_sparsity = token_sparsity(st.counts, ids.shape[1])
        return self.head(st), self.kept_mask(st)
