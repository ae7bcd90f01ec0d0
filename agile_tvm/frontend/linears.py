"""Every linear of a decoder (and its LM head) as Relax calls into `agile_tvm.kernels`.

One place decides how a checkpoint linear becomes kernel calls: which kernel (W4A8/W8A8 integer with static or
per-token activations, packed FP32 for float linears and W4A16), how its weights are packed at export, and which
activation quantizer feeds it. `GraphBuilder` mixes this in; it provides `n` (the current row count), `w()`,
`tir()`, `emit()`, `tap()`, `ckpt`, `target`, `kernels`, `weights` and `_act_cache`.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from agile_tvm.errors import UserError
from agile_tvm.frontend.checkpoint import LinearSpec, dequantized_weight, linear_spec

R = relax.op
HEAD = "lm_head"  # the LM head's module path in every supported architecture


class LinearEmitter:
    """Linears and the LM head of `GraphBuilder` (a mixin: it relies on the builder's state, see the module doc)."""

    def linear(self, x, prefix: str, k: int, n_out: int, weight_name: str | None = None):
        """y [n, N] = linear(x [n, K]): the integer kernel (W4A8/W8A8, 8- or 4-bit activation codes), W4A16 as a
        float linear of the dequantized weight, or a float linear not listed in `linears`."""
        spec = linear_spec(self.ckpt, prefix)
        if spec is None:
            bias = prefix + ".bias" if self.has(prefix + ".bias") else None
            return self.float_linear(x, k, n_out, weight_name or prefix + ".weight", bias)
        if spec.a_bits == 0:
            bias = prefix + ".bias" if spec.has_bias else None
            return self.float_linear(x, k, n_out, prefix + ".dequant_weight", bias,
                                     array=dequantized_weight(self.ckpt, prefix))
        return self.integer_linear(x, spec, k, n_out)

    def linears(self, x, prefixes: list[str], k: int, n_outs: list[int]) -> list:
        """Several linears reading the same x (q/k/v, gate/up): one output each. They are emitted one by one;
        linears with equal activation quantization share one quantizer call (see `quantize_act_*`)."""
        return [self.linear(x, p, k, n) for p, n in zip(prefixes, n_outs)]

    def integer_linear(self, x, spec: LinearSpec, k: int, n_out: int):
        """The contract's integer linear on `agile_tvm.kernels` (weights packed to its layout at export).

        4-bit activation codes (agileq4's o_proj) run through the same W4A8/W8A8 kernel: it multiplies uint8 codes
        and never assumes they use all 8 bits. Argument order: (xq, wpack, wsum, wscale, [wmin], act_scale,
        act_zero, [xsum], [bias]); act_scale/act_zero are 0-d weights (v1) or per-row outputs of the token
        quantizer (v2 `act: token`), xsum comes with v2's float weight offsets."""
        gv = self._linear_kernel(spec, k, n_out)
        p = spec.prefix
        self.tap(p + ":in", x)
        if spec.act == "token":
            xq, scale, zero, xsum = self.quantize_act_token(x, spec, k)
        else:
            xq, scale, zero = self.quantize_act_tensor(x, spec, k)
        args = [xq, self.w(p + ".wpack"), self.w(p + ".wsum"), self.w(p + ".wscale")]
        args += [self.w(p + ".wmin")] if spec.float_zero else []
        args += [scale, zero]
        args += [xsum] if spec.float_zero else []
        args += [self.w(p + ".bias")] if spec.has_bias else []
        return self.emit(relax.call_tir(gv, args, relax.TensorType([self.n, n_out], "float32")))

    def _decode_m(self):
        """m=1 when emitting the decode function (static one-token shapes get the kernels' GEMV schedules)."""
        return 1 if isinstance(self.n, int) else None

    def _linear_kernel(self, spec: LinearSpec, k: int, n_out: int) -> relax.GlobalVar:
        """Add the linear kernel for `spec`'s shape and options once; pack the linear's weights once."""
        if spec.float_zero and spec.act != "token":
            raise UserError(f"{self.ckpt.path}: linear {spec.prefix} has float weight offsets (w_zero float) with "
                            "per-tensor activations; the kernels support float offsets only with per-token "
                            "activations: quantize with act granularity token (the agileq8 default)")
        kern = self.kernels.integer
        m = self._decode_m()
        v2 = spec.act == "token"
        key = (f"k_linear_w{spec.w_bits}_{k}x{n_out}_g{spec.groups}{'_b' if spec.has_bias else ''}"
               f"{'_tok' if v2 else ''}{'_wmin' if spec.float_zero else ''}{'_m1' if m else ''}")
        try:
            if key not in self._funcs:
                make = kern.w4a8_linear_func if spec.w_bits == 4 else kern.w8a8_linear_func
                options = dict(act="token", has_wmin=spec.float_zero) if v2 else {}  # v1: the v1 signature
                func = make(n_out, k, self.target, group_size=k // spec.groups, has_bias=spec.has_bias, m=m,
                            **options)
                self.tir(key, func.without_attr("global_symbol"))
            if spec.prefix + ".wpack" not in self.weights.arrays:
                pack = kern.pack_w4a8_weights if spec.w_bits == 4 else kern.pack_w8a8_weights
                packed = pack(self.ckpt.tensor(spec.prefix + ".qweight"), self.ckpt.tensor(spec.prefix + ".wzero"),
                              self.target)
                self.weights.var(spec.prefix + ".wpack", packed["wpack"])
                self.weights.var(spec.prefix + ".wsum", packed["wsum"])
        except UserError as err:
            raise UserError(f"linear {spec.prefix} ({k} -> {n_out}) cannot run on the integer kernels: {err}") from None
        return self._funcs[key]

    def _act_shift(self, prefix: str, k: int) -> np.ndarray:
        shift = self.ckpt.tensors.get(prefix + ".act_shift")
        return np.zeros(k, np.uint8) if shift is None else shift.astype(np.uint8).reshape(k)

    def quantize_act_tensor(self, x, spec: LinearSpec, k: int):
        """(xq, act_scale, act_zero) with the layer-wise static scale (v1); linears reading the same x with equal
        parameters share one quantize call."""
        p, bits = spec.prefix, spec.a_bits
        scale = np.asarray(self.ckpt.tensor(p + ".act_scale"), np.float32).reshape(())
        zero = np.asarray(self.ckpt.tensor(p + ".act_zero"), np.int32).reshape(())
        shift = self._act_shift(p, k)
        s, zp = self.w(p + ".act_scale0", scale), self.w(p + ".act_zero0", zero)
        cache_key = ("tensor", id(x), bits, scale.tobytes(), zero.tobytes(), shift.tobytes())
        if cache_key not in self._act_cache:
            m = self._decode_m()
            key = f"k_quantize_act_{k}_a{bits}{'_m1' if m else ''}"
            if key not in self._funcs:
                self.tir(key, self.kernels.integer.quantize_act_func(k, bits, self.target, m=m)
                         .without_attr("global_symbol"))
            args = [x, s, zp, self.w(p + ".act_shift", shift)]
            xq = self.emit(relax.call_tir(self._funcs[key], args, relax.TensorType([self.n, k], "uint8")))
            self._act_cache[cache_key] = (xq, x)  # x kept alive: its id() must not be recycled while cached
        return self._act_cache[cache_key][0], s, zp

    def quantize_act_token(self, x, spec: LinearSpec, k: int):
        """(xq u8[n,K], act_scale f32[n], act_zero i32[n], xsum i32[n,G]) with per-row dynamic scales (v2).

        xsum is summed over the linear's weight groups when it has float offsets, else over all of K (unused, and
        the cheapest to produce). Linears reading the same x with the same shift and grouping share one call."""
        p, bits, n = spec.prefix, spec.a_bits, self.n
        g = k // spec.groups if spec.float_zero else k
        shift = self._act_shift(p, k)
        cache_key = ("token", id(x), bits, g, shift.tobytes())
        if cache_key not in self._act_cache:
            m = self._decode_m()
            key = f"k_quantize_act_token_{k}_a{bits}_g{g}{'_m1' if m else ''}"
            if key not in self._funcs:
                func = self.kernels.integer.quantize_act_token_func(k, bits, self.target,
                                                                    group_size=None if g == k else g, m=m)
                self.tir(key, func.without_attr("global_symbol"))
            outs = [relax.TensorType([n, k], "uint8"), relax.TensorType([n], "float32"),
                    relax.TensorType([n], "int32"), relax.TensorType([n, k // g], "int32")]
            both = self.emit(relax.call_tir(self._funcs[key], [x, self.w(p + ".act_shift", shift)], outs))
            parts = tuple(self.emit(relax.TupleGetItem(both, i)) for i in range(len(outs)))
            self._act_cache[cache_key] = (parts, x)  # x kept alive: its id() must not be recycled while cached
        return self._act_cache[cache_key][0]

    def float_linear(self, x, k: int, n_out: int, weight_name: str, bias_name: str | None, array=None):
        """y = x @ W.T (+ b) on the kernels' packed FP32 GEMM (GEMV when decoding)."""
        n = self.n
        m = self._decode_m()
        key = f"k_fp32_{k}x{n_out}{'_b' if bias_name else ''}{'_m1' if m else ''}"
        if key not in self._funcs:
            self.tir(key, self.kernels.fp32.fp32_linear_func(n_out, k, self.target, has_bias=bool(bias_name),
                                                             m=m).without_attr("global_symbol"))
        packed_name = weight_name + ".fp32pack"
        if packed_name not in self.weights.arrays:
            w = array if array is not None else self.ckpt.tensor(weight_name)
            self.weights.var(packed_name, self.kernels.fp32.pack_fp32_weights(w, self.target))
        args = [x, self.w(packed_name)] + ([self.w(bias_name)] if bias_name else [])
        return self.emit(relax.call_tir(self._funcs[key], args, relax.TensorType([n, n_out], "float32")))

    def lm_head(self, x, hidden: int, vocab: int, weight: str, last_only: bool):
        """The LM head: the integer kernel when the checkpoint quantizes it (`lm_head` in `linears`), else float
        `weight`; with `last_only` only the last row (prefill/decode need just the next token)."""
        if last_only:
            if not isinstance(self.n, int) or self.n != 1:
                x = self.emit(R.strided_slice(x, axes=[0], begin=[self.n - 1], end=[self.n]))
            n_saved, self.n = self.n, 1
            try:
                y = self.linear(x, HEAD, hidden, vocab, weight_name=weight)
            finally:
                self.n = n_saved
            return self.emit(R.reshape(y, [1, 1, vocab]))
        y = self.linear(x, HEAD, hidden, vocab, weight_name=weight)
        return self.emit(R.reshape(y, [1, self.n, vocab]))
