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
TILED = ".tiled"  # suffix of a per-group table stored tile-major for the kernels (`layout.tile_tables`)


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
        """Several linears reading the same x (q/k/v, gate/up): one output each.

        Integer linears with per-token activations and equal options (`_fusable`) share one weight copy,
        concatenated along N: decode runs them as one GEMV call that also quantizes x and writes one output per
        linear (`outs`, `x_float` of `kernels.linear.linear_tensors`); prefill as one call per linear on its slice
        of the concatenated weights after one shared quantizer call. Other linears are emitted one by one
        (linears with equal activation quantization still share the quantizer)."""
        specs = self._fusable(prefixes, k)
        if specs is None:
            return [self.linear(x, p, k, n) for p, n in zip(prefixes, n_outs)]
        fused = self._pack_fused(specs, k, n_outs)
        for p in prefixes:
            self.tap(p + ":in", x)
        if self._decode_m():
            gemv = self._gemv_tables(specs, k, fused["name"])
            gv = self._linear_kernel(specs[0], k, fused["n_total"], name=fused["name"], fused_specs=specs,
                                     outs=fused["outs"], x_float=True, **gemv)
            args = [x, self.w(specs[0].prefix + ".act_shift", self._act_shift(specs[0].prefix, k))]
            args += self._weight_args(fused["name"], specs[0], **gemv)
            out = self.emit(relax.call_tir(gv, args, [relax.TensorType([1, n], "float32") for n in n_outs]))
            return [self.emit(relax.TupleGetItem(out, j)) for j in range(len(n_outs))]
        xq, scale, zero, xsum = self.quantize_act_token(x, specs[0], k)
        if self._int_scale_grid(specs, k):
            self._pack_int_scales(specs, k, fused["name"])
            return [self._int_scale_call(specs[0], k, n_out, fused["name"], (xq, scale, zero, xsum), off,
                                         fused["n_total"]) for off, n_out in fused["outs"]]
        ys = []
        for (off, n_out) in fused["outs"]:
            gv = self._linear_kernel(specs[0], k, n_out, name=fused["name"], fused_specs=specs, n_offset=off,
                                     n_total=fused["n_total"])
            args = [xq, *self._weight_args(fused["name"], specs[0], [scale, zero] + ([xsum] if specs[0].float_zero
                                                                                      else []))]
            ys.append(self.emit(relax.call_tir(gv, args, relax.TensorType([self.n, n_out], "float32"))))
        return ys

    def _fusable(self, prefixes: list[str], k: int) -> list[LinearSpec] | None:
        """The specs of `prefixes` when they can share one concatenated weight (integer, per-token activations,
        the same kernel options, activation shifts and weight format), else None."""
        specs = [linear_spec(self.ckpt, p) for p in prefixes]
        if len(specs) < 2 or any(s is None or s.a_bits == 0 or s.act != "token" for s in specs):
            return None
        options = {(s.w_bits, s.a_bits, s.groups, s.float_zero, s.has_bias, self._weight_format(s, k)) for s in specs}
        shifts = {self._act_shift(s.prefix, k).tobytes() for s in specs}
        return specs if len(options) == 1 and len(shifts) == 1 else None

    def integer_linear(self, x, spec: LinearSpec, k: int, n_out: int):
        """The contract's integer linear on `agile_tvm.kernels` (weights packed to its layout at export).

        4-bit activation codes (agileq4's o_proj) run through the same W4A8/W8A8 kernel: it multiplies uint8 codes
        and never assumes they use all 8 bits. Argument order: (xq, wpack, wsum, wscale, [wmin], act_scale,
        act_zero, [xsum], [bias]); act_scale/act_zero are 0-d weights (v1) or per-row outputs of the token
        quantizer (v2 `act: token`), xsum comes with v2's float weight offsets. Decoding with per-token
        activations, the GEMV quantizes x itself: (x, act_shift, wpack, wsum, wscale, [wmin], [bias])."""
        p = spec.prefix
        self.tap(p + ":in", x)
        if spec.act == "token" and self._decode_m():
            gemv = self._gemv_tables([spec], k, p)
            gv = self._linear_kernel(spec, k, n_out, x_float=True, **gemv)
            args = [x, self.w(p + ".act_shift", self._act_shift(p, k)), *self._weight_args(p, spec, **gemv)]
            return self.emit(relax.call_tir(gv, args, relax.TensorType([1, n_out], "float32")))
        if spec.act == "token" and self._int_scale_grid([spec], k):
            wfmt = self._weight_format(spec, k)
            self._pack_linear(spec, wfmt, self._compact([spec], wfmt))  # the nibbles and tables decode shares
            self._pack_int_scales([spec], k, p)
            return self._int_scale_call(spec, k, n_out, p, self.quantize_act_token(x, spec, k))
        gv = self._linear_kernel(spec, k, n_out)
        if spec.act == "token":
            xq, scale, zero, xsum = self.quantize_act_token(x, spec, k)
        else:
            xq, scale, zero = self.quantize_act_tensor(x, spec, k)
        args = [xq, *self._weight_args(p, spec, [scale, zero] + ([xsum] if spec.float_zero else []))]
        return self.emit(relax.call_tir(gv, args, relax.TensorType([self.n, n_out], "float32")))

    def _grid_codes(self, spec: LinearSpec):
        """The linear's (c, d, e) power-of-two grid codes (``kernels.int_scales.grid_codes``) or None, once."""
        from agile_tvm.kernels.int_scales import grid_codes

        cache = self.__dict__.setdefault("_grid_cache", {})
        if spec.prefix not in cache:
            cache[spec.prefix] = grid_codes(self.ckpt.tensor(spec.prefix + ".wscale"),
                                            self.ckpt.tensor(spec.prefix + ".wmin"))
        return cache[spec.prefix]

    def _int_scale_grid(self, specs: list[LinearSpec], k: int) -> bool:
        """Whether prefill runs `specs` on the integer-scale GEMM (``kernels/int_scales.py``): 4-bit nibble weights
        with float offsets whose scales and offsets lie on a power-of-two row grid (checkpoints quantized with
        ``--scale-grid pow2``), per-token activations, a shape the kernel chunks. Bit for bit the same weights as
        the float tables; the GEMM then sums a row's groups in integers instead of converting every group. Decode
        then reads the same grid codes (`_gemv_tables`)."""
        from agile_tvm.kernels.int_scales import applicable
        from agile_tvm.targets import isa_of

        ok = all(s.w_bits == 4 and s.act == "token" and s.float_zero and self._weight_format(s, k) == "nibble"
                 and applicable(isa_of(self.target), k, k // s.groups) for s in specs)
        return ok and all(bool(np.all(self.ckpt.tensor(s.prefix + ".wzero") == 0)) and self._grid_codes(s) is not None
                          for s in specs)

    def _pack_int_scales(self, specs: list[LinearSpec], k: int, name: str) -> None:
        """The integer-scale tables of `specs` (concatenated along N like their weights) under `name`, once."""
        from agile_tvm.kernels.int_scales import pack_tables
        from agile_tvm.kernels.reference import unpack_int4

        if name + ".c8" in self.weights.arrays:
            return
        parts = [pack_tables(unpack_int4(self.ckpt.tensor(s.prefix + ".qweight")), *self._grid_codes(s), self.target)
                 for s in specs]
        for suffix in parts[0]:
            self.weights.var(f"{name}.{suffix}", np.concatenate([pt[suffix] for pt in parts], axis=0))

    def _int_scale_call(self, spec: LinearSpec, k: int, n_out: int, name: str, act, n_offset: int = 0,
                        n_total: int | None = None):
        """y [n, N] of one linear (or one slice of fused linears) on the integer-scale GEMM."""
        from agile_tvm.kernels.int_scales import int_scale_linear_func

        key = f"k_linear_w4_{k}x{n_out}_g{spec.groups}_intscale{'_b' if spec.has_bias else ''}_of{n_offset}_{n_total}"
        if key not in self._funcs:
            func = int_scale_linear_func(n_out, k, self.target, group_size=k // spec.groups,
                                         has_bias=spec.has_bias, n_offset=n_offset, n_total=n_total)
            self.tir(key, func.without_attr("global_symbol").with_attr("agile_tvm.schedule", self._hand_mark()))
        xq, scale, zero, xsum = act
        tables = [self.w(f"{name}.{t}") for t in ("c8", "d16", "zc", "srow")]
        args = [xq, self.w(name + ".wpack"), *tables, scale, zero, xsum]
        args += [self.w(name + ".bias")] if spec.has_bias else []
        return self.emit(relax.call_tir(self._funcs[key], args, relax.TensorType([self.n, n_out], "float32")))

    def _weight_args(self, name: str, spec: LinearSpec, act_args=(), zero_in_dot: bool = False,
                     grid: bool = False) -> list:
        """(wpack, [wsum], wscale, [wmin], *act_args, [bias]) of linear (or fused linears) `name`; no wsum for a
        GEMV with the zero point inside its dot (`_zero_in_dot`); (wpack, c8, d16, srow, ...) for one reading the
        integer-scale GEMM's grid codes instead of float tables (`_gemv_tables`)."""
        if grid:
            args = [self.w(f"{name}.{t}") for t in ("wpack", "c8", "d16", "srow")]
        else:
            args = [self.w(name + ".wpack")] + ([] if zero_in_dot else [self.w(name + ".wsum")]) \
                + [self.w(name + ".wscale" + TILED)]
            args += [self.w(name + ".wmin" + TILED)] if spec.float_zero else []
        return args + list(act_args) + ([self.w(name + ".bias")] if spec.has_bias else [])

    def _gemv_tables(self, specs: list[LinearSpec], k: int, name: str) -> dict:
        """The decode GEMV's table options for `specs` (weights under `name`): ``zero_in_dot`` when it needs no
        row sums (`_zero_in_dot`), and ``grid`` when prefill runs them on the integer-scale GEMM, whose grid codes
        (c u8 and d i16 per group, 2^e per row) then serve decode too: the same floats as the float16 tables (so
        the same logits bit for bit), 3 bytes per group read instead of 4, and the float16 tables leave the
        module (no function reads them)."""
        if not self._zero_in_dot(specs, k):
            return {}
        if not self._int_scale_grid(specs, k):
            return {"zero_in_dot": True}
        self._pack_int_scales(specs, k, name)
        return {"zero_in_dot": True, "grid": True}

    def _decode_m(self):
        """m=1 when emitting the decode function (static one-token shapes get the kernels' GEMV schedules)."""
        return 1 if isinstance(self.n, int) else None

    def _linear_kernel(self, spec: LinearSpec, k: int, n_out: int, name: str | None = None,
                       fused_specs: list[LinearSpec] | None = None, **fusion) -> relax.GlobalVar:
        """Add the linear kernel for `spec`'s shape and options once (`fusion`: n_offset/n_total/outs/x_float of
        `kernels.linear.linear_tensors`); pack the linear's weights once (fused weights: `_pack_fused`, with
        `name` and `fused_specs`)."""
        if spec.float_zero and spec.act != "token":
            raise UserError(f"{self.ckpt.path}: linear {spec.prefix} has float weight offsets (w_zero float) with "
                            "per-tensor activations; the kernels support float offsets only with per-token "
                            "activations: quantize with act granularity token (the agileq8 default)")
        kern = self.kernels.integer
        m = self._decode_m()
        v2 = spec.act == "token"
        wfmt = self._weight_format(spec, k)
        if fusion.get("x_float"):
            fusion["a_bits"] = spec.a_bits
        fusion["compact"] = self._compact(fused_specs or [spec], wfmt)
        key = (f"k_linear_w{spec.w_bits}_{k}x{n_out}_g{spec.groups}{'_b' if spec.has_bias else ''}"
               f"{'_tok' if v2 else ''}{'_wmin' if spec.float_zero else ''}{'_m1' if m else ''}_{wfmt}"
               + "".join(f"_{opt}{value}" for opt, value in sorted(fusion.items())).replace(" ", ""))
        try:
            if key not in self._funcs:
                make = kern.w4a8_linear_func if spec.w_bits == 4 else kern.w8a8_linear_func
                options = dict(act="token", has_wmin=spec.float_zero) if v2 else {}  # v1: the v1 signature
                options = dict(group_size=k // spec.groups, has_bias=spec.has_bias, m=m, wfmt=wfmt, tables="tiled",
                               **options, **fusion)
                func = self._tuned_kernel(make, spec.w_bits, n_out, k, options)
                if func is None:
                    func = make(n_out, k, self.target, **options).with_attr("agile_tvm.schedule", self._hand_mark())
                self.tir(key, func.without_attr("global_symbol"))
            if name is None:
                self._pack_linear(spec, wfmt, fusion["compact"])
        except UserError as err:
            raise UserError(f"linear {spec.prefix} ({k} -> {n_out}) cannot run on the integer kernels: {err}") from None
        return self._funcs[key]

    def _pack_linear(self, spec: LinearSpec, wfmt: str, compact: bool) -> None:
        """One linear's packed weights and tables (`_packed_arrays`) as module weights, once."""
        if spec.prefix + ".wpack" not in self.weights.arrays:
            for suffix, array in self._packed_arrays(spec, wfmt, compact).items():
                self.weights.var(spec.prefix + suffix, array)

    def _tuned_kernel(self, make, wbits: int, n_out: int, k: int, options: dict):
        """The kernel `make(n_out, k, target, **options)` with its tuned schedule from `schedules/<target>/`, or
        None (the caller keeps the hand schedule). The records are opened once per build and matched by the
        kernel's unscheduled TE (`tune.records`): a static (decode) kernel's own, a symbolic-M (prefill) kernel's
        static proxy's (M = `PREFILL_PROXY_M`), whose trace is replayed on it. A builder with a `kernel_specs`
        dict also collects every static kernel and proxy there (what `agile-tvm tune --model` tunes)."""
        from agile_tvm.tune.records import ScheduleRecords
        from agile_tvm.tune.workloads import PREFILL_PROXY_M

        specs = self.__dict__.get("kernel_specs")
        if "_schedule_records" not in self.__dict__:
            self._schedule_records = ScheduleRecords.for_target(self.target)
        records = self._schedule_records
        if specs is None and records is None:
            return None  # nothing to collect or look up: skip building the unscheduled twin
        symbolic = options.get("m") is None
        keyed = dict(options, m=PREFILL_PROXY_M) if symbolic else options
        unscheduled = make(n_out, k, self.target, schedule=False, **keyed)
        if specs is not None:
            specs[str(unscheduled.attrs["global_symbol"])] = dict(wbits=wbits, N=n_out, K=k, options=keyed)
        if records is None:
            return None
        if symbolic:
            tuned = records.replayed(make(n_out, k, self.target, schedule=False, **options), unscheduled)
            how = f"record {records.target_name} (M={PREFILL_PROXY_M} proxy)"
        else:
            tuned, how = records.tuned(unscheduled), f"record {records.target_name}"
        return None if tuned is None else tuned.with_attr("agile_tvm.schedule", how)

    def _hand_mark(self) -> str:
        """How a static kernel without a record is marked for the compile log: "hand x86-avx2" (records looked up,
        none matched) or "hand" (no records for this target)."""
        records = self.__dict__.get("_schedule_records")
        return f"hand {records.target_name}" if records is not None else "hand"

    def _packed(self, spec: LinearSpec, wfmt: str) -> tuple[np.ndarray, dict]:
        """(the linear's codes packed as int8 tiles or nibbles, its per-group tables channel-major by name
        suffix), packed once per builder (the three functions share them)."""
        cache = self.__dict__.setdefault("_packed_cache", {})
        if spec.prefix not in cache:
            kern, p = self.kernels.integer, spec.prefix
            pack = kern.pack_w4a8_weights if spec.w_bits == 4 else kern.pack_w8a8_weights
            packed = pack(self.ckpt.tensor(p + ".qweight"), self.ckpt.tensor(p + ".wzero"), self.target, wfmt=wfmt)
            tables = {".wsum": packed["wsum"],
                      ".wscale" + TILED: np.asarray(self.ckpt.tensor(p + ".wscale"), np.float32)}
            if spec.float_zero:
                tables[".wmin" + TILED] = np.asarray(self.ckpt.tensor(p + ".wmin"), np.float32)
            cache[spec.prefix] = (packed["wpack"], tables)
        return cache[spec.prefix]

    def _zero_in_dot(self, specs: list[LinearSpec], k: int) -> bool:
        """Whether the decode GEMV of `specs` can run with the activation zero point inside its dot and so read no
        row sums (`kernels.linear` ``zero_in_dot``): nibble weights with float offsets and wzero = 0 in every group
        (the contract's v2 weights), where the results are bit for bit the row-sum kernel's. It reads 5 bits per
        weight instead of 6: the row sums were a sixth of what a W4 GEMV reads."""
        wfmt = self._weight_format(specs[0], k)
        if wfmt != "nibble" or not all(s.float_zero and s.act == "token" for s in specs):
            return False
        return all(bool(np.all(self._packed(s, wfmt)[1][".wsum"][:, 1] == 8)) for s in specs)

    def _compact(self, specs: list[LinearSpec], wfmt: str) -> bool:
        """Whether the linears' tables are exact in 16 bits (float16 scales/offsets, as weights born in fp16 blocks
        such as Q4_1 have; int16 row sums): then the kernels read them compact (`kernels.linear.COMPACT`)."""
        def exact16(a):
            narrow = a.astype(np.float16 if a.dtype.kind == "f" else np.int16)
            return bool(np.array_equal(narrow.astype(a.dtype), a))

        return all(exact16(t) for s in specs for t in self._packed(s, wfmt)[1].values())

    def _packed_arrays(self, spec: LinearSpec, wfmt: str, compact: bool) -> dict:
        """The linear's weights in its kernel's layout, by name suffix: packed codes, the per-group tables (row
        sums, scales, offsets) tile-major (`layout.tile_tables`) so the GEMV reads them as vectors, in 16 bits
        when `compact`, and the bias."""
        from agile_tvm.kernels.layout import tile_tables

        wpack, tables = self._packed(spec, wfmt)
        arrays = {".wpack": wpack}
        for suffix, table in tables.items():
            if compact:
                table = table.astype(np.float16 if table.dtype.kind == "f" else np.int16)
            arrays[suffix] = tile_tables(table, self.target, spec.w_bits, wfmt)
        if spec.has_bias:
            arrays[".bias"] = np.asarray(self.ckpt.tensor(spec.prefix + ".bias"), np.float32)
        return arrays

    def _pack_fused(self, specs: list[LinearSpec], k: int, n_outs: list[int]) -> dict:
        """Concatenate the packed weights of `specs` along N (each padded to whole tiles) under one name, once;
        returns {"name", "outs": ((offset, N_j), ...), "n_total"}."""
        from agile_tvm.kernels.layout import tile_tables

        name = "+".join(s.prefix for s in specs)
        wfmt = self._weight_format(specs[0], k)
        compact = self._compact(specs, wfmt)
        parts = [self._packed_arrays(s, wfmt, compact) if name + ".wpack" not in self.weights.arrays else None
                 for s in specs]
        nb = tile_tables(np.zeros((1, 1), np.float32), self.target, specs[0].w_bits, wfmt).shape[-1]
        pads = [-(-n // nb) * nb for n in n_outs]
        outs = tuple((int(sum(pads[:j])), int(n)) for j, n in enumerate(n_outs))
        if parts[0] is not None:
            for suffix in parts[0]:
                arrays = [pt[suffix] for pt in parts]
                if suffix == ".bias":
                    arrays = [np.pad(a, (0, pad - a.shape[0])) for a, pad in zip(arrays, pads)]
                self.weights.var(name + suffix, np.concatenate(arrays, axis=0))
        return {"name": name, "outs": outs, "n_total": int(sum(pads))}

    def _weight_format(self, spec: LinearSpec, k: int) -> str:
        """The packed weight format of a linear (the same in every function: they share the weights).

        4-bit weights on AVX2 stay nibbles (half the bytes; the GEMM unpacks each panel once, the GEMV in
        registers). 8-bit weights on AVX2 go in int8 tiles (signed-byte products, half the bytes of the int16 tiles: the
        INT8 LM head's decode GEMV measured 3.8x faster) whenever |q - wzero| <= 127, which symmetric 8-bit
        weights always satisfy; otherwise the ISA's default."""
        from agile_tvm.kernels.layout import default_wfmt
        from agile_tvm.targets import isa_of

        isa = isa_of(self.target)
        if spec.w_bits == 4:  # 4-bit codes stay 4-bit in memory, unpacked by the kernels (AVX2, groups % 16 == 0)
            return "nibble" if isa == "avx2" and (k // spec.groups) % 16 == 0 else "int8"
        if isa != "avx2":
            return default_wfmt(isa, 8)
        formats = self.__dict__.setdefault("_weight_formats", {})  # per linear, decided once per builder
        if spec.prefix not in formats:
            q = self.ckpt.tensor(spec.prefix + ".qweight").astype(np.int32)
            wz = self.ckpt.tensor(spec.prefix + ".wzero").astype(np.int32)
            w = q - np.repeat(wz, q.shape[1] // wz.shape[1], axis=1)
            formats[spec.prefix] = "int8" if -127 <= w.min() and w.max() <= 127 else "int16"
        return formats[spec.prefix]

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

    def embedding_from_head(self, embed_name: str) -> tuple[str, str] | None:
        """(packed codes, tile-major scales) of the INT8 LM head when its dequantized weights equal the float
        embedding `embed_name` bit for bit, else None. A tied head quantized from a table already on its grid has
        exactly that (SmolLM2 ships its embedding as Q8_0 blocks of 32, which the head's symmetric groups of 32
        reproduce): the embedding is then read from the head's codes (`tir_ops.embed_codes`) and the float table,
        113 MB of SmolLM2's 247 MB module, is not stored. The check compares the float32 products the kernel
        computes, so anything else (another grid, TRIP-shifted codes, an untied head) keeps the float table."""
        cache = self.__dict__.setdefault("_embedding_from_head", {})
        if embed_name not in cache:
            cache[embed_name] = self._head_codes_equal(embed_name)
        return cache[embed_name]

    def _head_codes_equal(self, embed_name: str) -> tuple[str, str] | None:
        spec = linear_spec(self.ckpt, HEAD)
        if spec is None or spec.w_bits != 8 or spec.float_zero:
            return None
        table = self.ckpt.tensor(embed_name)
        q = self.ckpt.tensor(HEAD + ".qweight")
        if q.shape != table.shape or not np.array_equal(dequantized_weight(self.ckpt, HEAD), table):
            return None
        k = q.shape[1]
        wfmt = self._weight_format(spec, k)
        self._pack_linear(spec, wfmt, self._compact([spec], wfmt))  # the arrays the head's kernels read
        return HEAD + ".wpack", HEAD + ".wscale" + TILED

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
