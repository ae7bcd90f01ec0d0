"""Integer TensorIR kernels of agile-tvm (issue 3): the public API the Relax frontend calls.

Every ``*_func`` returns a *scheduled* ``tvm.tirx.PrimFunc`` (attrs ``tirx.is_scheduled`` / ``tir.is_scheduled``
set, so Relax legalization and dlight leave it alone) for one named target (``agile_tvm.targets``); add it to an
IRModule and call it with ``relax.call_tir``. Weights and feature sizes are static; the token count ``M`` (and the
key count ``N`` of attention) are symbolic ``int64`` vars, so one compiled function serves prefill (any M) and
decode (M = 1). Pass ``m=1`` to a linear to get its decode (GEMV) schedule with M fixed to 1.
Scalars (scales, zero points) are 0-d tensors, as stored in the checkpoint. Integer math follows
docs/checkpoint.md exactly; ``reference`` holds the numpy twin of each kernel (bit-exact on the integer part),
``cases`` builds valid random inputs + expected outputs for every kernel.

Linear kernels, x [M, K] -> y [M, N]; parameter order of the returned PrimFunc:

    w4a8_linear_func(N, K, target, *, group_size=None, has_bias=False, requant=False, m=None, wfmt="int8")
    w8a8_linear_func(N, K, target, *, group_size=None, has_bias=False, requant=False, m=None)
        (xq u8[M,K], wpack, wsum, wscale f32[N,G], act_scale f32[], act_zero i32[], [bias f32[N]],
         [out_scale f32[], out_zero i32[], out_shift u8[N]]  (requant=True),   y f32[M,N] | yq u8[M,N])
    w4a4_linear_func(N, K, target, *, has_bias=False, m=None)        (per-channel weights only)
        (xq u8[M,K] holding 4-bit codes 0..15, wpack u16, wsum i32[., 2], wscale f32[N,1], act_scale,
         act_zero, [bias], y f32[M,N])
    fp32.fp32_linear_func(N, K, target, *, has_bias=False, m=None)   (x f32[M,K], w packed, [bias], y)

    pack_w4a8_weights(qweight u8[N,K/2], wzero i8[N,G], target, wfmt="int8") -> {"wpack", "wsum"}
    pack_w8a8_weights(qweight i8[N,K], wzero i8[N,G], target) -> {"wpack", "wsum"}
    pack_w4a4_weights(qweight u8[N,K/2], wzero i8[N,1], target) -> {"wpack", "wsum"}
    fp32.pack_fp32_weights(weight f32[N,K], target) -> array
  Packing runs once at export time (numpy). Layouts are per ISA family (``layout.py``): int8 tiles
  [N/8, K/4, 8, 4] (AVX2) / [N/16, K/4, 16, 4] (AVX-512) holding q - wzero, int16 tiles for W8A8 on x86,
  [N/4, K/4, 4, 4] on AArch64; ``wfmt="nibble"`` keeps W4A8 weights 4-bit in memory (x86, group % 16 == 0).
  N is padded to the tile inside the packed weights; K must be a multiple of 4 (UserError otherwise).

Activation quantization (TRIP):
    quantize_act_func(K, bits, target, m=None): (x f32[M,K], act_scale f32[], act_zero i32[], act_shift u8[K],
                                                  xq u8[M,K])

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
    "pack_w4a8_weights": "layout",
    "pack_w8a8_weights": "layout",
    "pack_w4a4_weights": "layout",
    "quantize_act_func": "quantize",
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
