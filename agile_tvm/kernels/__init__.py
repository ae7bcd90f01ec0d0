"""Integer TensorIR kernels of agile-tvm (issue 3): the public API the Relax frontend calls.

Every ``*_func`` returns a *scheduled* ``tvm.tirx.PrimFunc`` (attrs ``tirx.is_scheduled`` / ``tir.is_scheduled``
set, so Relax legalization and dlight leave it alone) for one named target (``agile_tvm.targets``); add it to an
IRModule and call it with ``relax.call_tir``. Weights and feature sizes are static; the token count ``M`` (and the
key count ``N`` of attention) are symbolic ``int64`` vars, so one compiled function serves prefill (any M) and
decode (M = 1). Pass ``m=1`` to a linear to get its decode (GEMV) schedule with M fixed to 1.
Scalars (v1 scales, zero points) are 0-d tensors, as stored in the checkpoint; v2 per-token scales and zero points
are per-row tensors computed at run time (quantize_act_token_func). Integer math follows
docs/checkpoint.md exactly; ``reference`` holds the numpy twin of each kernel (bit-exact on the integer part),
``cases`` builds valid random inputs + expected outputs for every kernel.

Linear kernels, x [M, K] -> y [M, N]; parameter order of the returned PrimFunc:

    w4a8_linear_func(N, K, target, *, group_size=None, has_bias=False, requant=False, m=None, wfmt="int8",
                     act="tensor", has_wmin=False)
    w8a8_linear_func(N, K, target, *, group_size=None, has_bias=False, requant=False, m=None,
                     act="tensor", has_wmin=False)
        (xq u8[M,K], wpack, wsum, wscale f32[N,G], [wmin f32[N,G]  (has_wmin)], act_scale, act_zero,
         [xsum i32[M,G]  (has_wmin)], [bias f32[N]],
         [out_scale f32[], out_zero i32[], out_shift u8[N]]  (requant=True),   y f32[M,N] | yq u8[M,N])
      act="tensor" (checkpoint v1): act_scale f32[], act_zero i32[] (0-d).
      act="token" (v2): act_scale f32[M], act_zero i32[M], one per row, as quantize_act_token_func writes them.
      has_wmin=True (v2 float weight offsets, "w_zero": "float"): wmin and the per-row group sums xsum of
        (xq - zp); needs act="token" (UserError otherwise). Any wzero works (the contract's v2 has wzero = 0).
        y[m, n] = s_m * sum_g (wscale[n, g] * acc[m, n, g] + wmin[n, g] * xsum[m, g]) + bias[n]
      requant=True needs act="tensor" (UserError otherwise).
      wfmt: "int8" tiles (default for 4-bit), "nibble" (4-bit in memory, x86 AVX2/AVX-512, groups % 16 == 0:
        the GEMV unpacks in registers, the GEMM unpacks each weight panel once into int8 tiles), "int16" (default
        for 8-bit on x86) or "int8" for 8-bit on AVX2 (signed activations xq - 128 with vpsignb + vpmaddubsw,
        half the bytes; needs |q - wzero| <= 127).
      tables="tiled": wsum/wscale/wmin tile-major [N/nb, (2,) G, nb] (layout.tile_tables), read as vectors by the
        GEMV; compact=True stores them float16/int16 (exact when the values fit: the caller checks).
      Linears sharing an input, weights concatenated along N (tiled tables): n_offset/n_total = one linear's slice
        (prefill); m=1 with outs=((offset, N_j), ...) = one GEMV writing one output per linear, and x_float=True =
        the GEMV takes (x f32[1,K], act_shift u8[K]) and runs the per-token quantizer itself (decode):
        (x, act_shift, wpack, wsum, wscale, [wmin], [bias], y_0, y_1, ...).
    int_scales.int_scale_linear_func(N, K, target, *, group_size, has_bias=False, n_offset=0, n_total=None)
        The W4A8 prefill GEMM (symbolic M, x86 nibble weights) for weights on a power-of-two scale grid
        (``int_scales.grid_codes``: wscale = 2^e_n * c, wmin = 2^e_n * d): a row's groups summed in int32 per K chunk,
        no per-group float epilogue. (xq, wpack, ct, dt, zc, srow (``int_scales.pack_tables``), act_scale f32[M],
        act_zero i32[M], xsum i32[M,G], [bias], y f32[M,N]).
    w4a4_linear_func(N, K, target, *, has_bias=False, m=None)        (per-channel weights only)
        (xq u8[M,K] holding 4-bit codes 0..15, wpack u16, wsum i32[., 2], wscale f32[N,1], act_scale,
         act_zero, [bias], y f32[M,N])
    fp32.fp32_linear_func(N, K, target, *, has_bias=False, m=None)   (x f32[M,K], w packed, [bias], y)

    pack_w4a8_weights(qweight u8[N,K/2], wzero i8[N,G], target, wfmt="int8") -> {"wpack", "wsum"}
    pack_w8a8_weights(qweight i8[N,K], wzero i8[N,G], target, wfmt=None) -> {"wpack", "wsum"}
    layout.tile_tables(table [N, ...], target, wbits, wfmt) -> [N_pad/nb, ..., nb]   (tables="tiled")
    pack_w4a4_weights(qweight u8[N,K/2], wzero i8[N,1], target) -> {"wpack", "wsum"}
    fp32.pack_fp32_weights(weight f32[N,K], target) -> array
  Packing runs once at export time (numpy). Layouts are per ISA family (``layout.py``): int8 tiles
  [N/8, K/4, 8, 4] (AVX2) / [N/16, K/4, 16, 4] (AVX-512) holding q - wzero, int16 tiles for W8A8 on x86,
  [N/4, K/4, 4, 4] on AArch64; ``wfmt="nibble"`` keeps W4A8 weights 4-bit in memory (x86, group % 16 == 0).
  N is padded to the tile inside the packed weights; K must be a multiple of 4 (UserError otherwise).
  Grouped weights (G > 1) keep their int32 and float tiles in registers (schedule.py): W4A8 g32 at M = 512 on
  SmolLM2's shapes measured 1.13-1.4x the per-channel time (v1), 1.3-1.55x with v2's per-token zero points and
  float offsets (was 1.7-7x; Zen 3, shared machine).

Activation quantization (TRIP):
    quantize_act_func(K, bits, target, m=None): (x f32[M,K], act_scale f32[], act_zero i32[], act_shift u8[K],
                                                  xq u8[M,K])
    quantize_act_token_func(K, bits, target, *, group_size=None, m=None)     (checkpoint v2, per row, dynamic)
        (x f32[M,K], act_shift u8[K], xq u8[M,K], act_scale f32[M], act_zero i32[M], xsum i32[M,G])
        G = K // group_size (1 when group_size is None, -1 or K); the four last parameters are outputs, so in
        Relax it is one call_tir with a tuple of four output types. Bit-exact to reference.quantize_act_token.

Attention (GQA: query head h reads KV head h // (Hq // Hkv)); M queries, N keys, both symbolic; D % 8 == 0:
    qk_int8_func(Hq, Hkv, D, target): (q8 i8[Hq,M,D], k8 i8[Hkv,N,D], q_scale f32[], k_scale f32[],
                                       s f32[Hq,M,N])   s = float(int32 dot) * (q_scale*k_scale) * (1/sqrt(D))
    log2_softmax_quant_func(Hq, bits, target): (p f32[Hq,M,N], codes u8[Hq,M,N], pmax f32[Hq,M])
    attn_v_log2_func(Hq, Hkv, D, bits, target): (codes u8[Hq,M,N], v8 i8[Hkv,N,D], pmax f32[Hq,M],
                                                  v_scale f32[], out f32[Hq,M,D])
  The mask and the float softmax stay in Relax between QK and the log2 step (tests/test_kernels_relax.py shows
  the chain).

Building: ``build(func, target)`` -> runtime Module; ``export(func, target, path)`` writes a .so (cross-linked
for aarch64); ``qemu.run`` executes cross-compiled kernels on the emulated boards of ``scripts/setup-boards``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "w4a8_linear_func": "linear",
    "w8a8_linear_func": "linear",
    "w4a4_linear_func": "w4a4",
    "int_scale_linear_func": "int_scales",
    "pack_w4a8_weights": "layout",
    "pack_w8a8_weights": "layout",
    "pack_w4a4_weights": "layout",
    "quantize_act_func": "quantize",
    "quantize_act_token_func": "quantize",
    "qk_int8_func": "attention",
    "log2_softmax_quant_func": "attention",
    "attn_v_log2_func": "attention",
    "build": "compiler",
    "export": "compiler",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    """Lazy re-export: importing agile_tvm.kernels stays cheap until a kernel is actually built."""
    if name in _EXPORTS:
        mod = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(mod, name)
    raise AttributeError(name)
