"""Quantized self-attention for LLaMA (GQA, RoPE), OPT and BLOOM (ALiBi), written against transformers 5.23's modules.

The projections are the Hugging Face attention module's own linears (QuantLinear after quantization); this module
re-implements only the part between them, with the contract's quant points (docs/checkpoint.md):
- Q and K after RoPE and V: symmetric per-tensor INT8, `clip(floor(x / s + 0.5), -127, 127)`;
- scores `(q8 . k8) * q_scale * k_scale / sqrt(head_dim)` + mask/ALiBi, softmax in float32;
- softmax output: log2 codes per query row (paper eq. 3), dequantized `pmax * 2^-c`, top code = 0;
- AttnV: `(v_scale * pmax) * S` with `S = sum_j 2^-c[i, j] * v8[j, :]` summed exactly (float64), as the contract
  and the kernels compute it.
Scales are buffers `q_scale`, `k_scale`, `v_scale` on the Hugging Face attention module, so state_dict names are
the contract's `L.q_scale`. During calibration (`ctx.calibrating`) missing scales are set from the batch by an
L2-optimal clipping search, then used at once.

OPT detail: Hugging Face pre-scales q by head_dim^-0.5 before the attention call; here q is quantized unscaled and
the 1/sqrt(head_dim) goes into the score scale, as the contract writes it (equal in exact arithmetic).
Positions: every function takes `pos` [B, n], the original positions of the tokens still present (token pruning
removes rows but keeps positions), and builds RoPE / ALiBi / the causal mask from them.
The function also returns the pruning score of each token, `sum_h p^[h, i, 0]` (attention to the first token).
"""

from __future__ import annotations

import torch

from agile_tvm.quant.quantizers import log2_codes, log2_dequant, quantize_sym8, search_sym8_scale


def _ensure_scales(attn, q, k, v, ctx) -> bool:
    """True when attention is quantized; in calibration, sets missing scales from this batch."""
    if ctx.attention is None:
        return False
    if not hasattr(attn, "q_scale"):
        if not ctx.calibrating:
            raise RuntimeError("quantized attention has no scales: quantize or load the model first")
        attn.register_buffer("q_scale", search_sym8_scale(q))
        attn.register_buffer("k_scale", search_sym8_scale(k))
        attn.register_buffer("v_scale", search_sym8_scale(v))
    return True


def attention_core(attn, q, k, v, scale: float, pos: torch.Tensor, ctx, alibi_slopes=None):
    """q [B, H, n, d], k/v [B, H, n, d] (KV heads already repeated). Returns (out [B, n, H*d], scores [B, n])."""
    quant = _ensure_scales(attn, q, k, v, ctx)
    if quant:
        q = quantize_sym8(q, attn.q_scale)
        k = quantize_sym8(k, attn.k_scale)
        v = quantize_sym8(v, attn.v_scale)
        score_scale = attn.q_scale * attn.k_scale * scale
    else:
        score_scale = scale
    bsz, heads, n, d = q.shape
    outs, scores = [], []
    for b in range(bsz):  # one sequence at a time: the [H, n, n] scores of a batch would not fit
        s = (q[b] @ k[b].transpose(-1, -2)) * score_scale
        if alibi_slopes is not None:
            s = s + alibi_slopes[:, None, None] * pos[b].to(s.dtype)[None, None, :]
        future = pos[b][None, :] > pos[b][:, None]
        s = s.masked_fill(future[None], float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32)
        if quant:
            # the contract's AttnV: v_scale * pmax * S with S = sum_j 2^-c v8 exact (float64 holds it: 2^-14 steps,
            # |S| < 2^7 * n), so every implementation that follows the contract gets the same o to the last bit.
            # (Summing pmax * 2^-c * v8 in float32 instead rounds each product and the sum: o then sits next to the
            # lattice the per-token o_proj codes are cut from, and .5 ties break differently - measured 1.6% ppl.)
            bits = ctx.attention.softmax_bits
            c, pmax = log2_codes(p, bits)
            top = 2**bits - 1
            w = torch.where(c >= top, torch.zeros_like(c), torch.exp2(-c))
            o = (w.double() @ v[b].double()).float() * (attn.v_scale * pmax)
            p = log2_dequant(c, pmax, bits)
        else:
            o = p @ v[b]
        outs.append(o.transpose(0, 1).reshape(n, heads * d))
        scores.append(p[:, :, 0].sum(0))
    return torch.stack(outs), torch.stack(scores)


def _heads(x, n_heads, head_dim):
    b, n, _ = x.shape
    return x.view(b, n, n_heads, head_dim).transpose(1, 2)


def llama_attention(attn, h, pos, ctx):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    hd = attn.head_dim
    q = _heads(attn.q_proj(h), attn.q_proj.out_features // hd, hd)
    k = _heads(attn.k_proj(h), attn.k_proj.out_features // hd, hd)
    v = _heads(attn.v_proj(h), attn.v_proj.out_features // hd, hd)
    cos, sin = ctx.rotary(h, pos)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    v = repeat_kv(v, attn.num_key_value_groups)
    out, scores = attention_core(attn, q, k, v, attn.scaling, pos, ctx)
    return attn.o_proj(out), scores


def opt_attention(attn, h, pos, ctx):
    q = _heads(attn.q_proj(h), attn.num_heads, attn.head_dim)
    k = _heads(attn.k_proj(h), attn.num_heads, attn.head_dim)
    v = _heads(attn.v_proj(h), attn.num_heads, attn.head_dim)
    out, scores = attention_core(attn, q, k, v, attn.head_dim**-0.5, pos, ctx)
    return attn.out_proj(out), scores


def bloom_attention(attn, h, pos, ctx):
    b, n, _ = h.shape
    fused = attn.query_key_value(h).view(b, n, attn.num_heads, 3, attn.head_dim)
    q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
    out, scores = attention_core(attn, q, k, v, attn.inv_norm_factor, pos, ctx, alibi_slopes=ctx.alibi_slopes)
    return attn.dense(out), scores
