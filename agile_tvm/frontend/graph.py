"""Relax graph building blocks shared by the LLaMA, OPT and BLOOM builders.

`GraphBuilder` wraps a `relax.BlockBuilder` with the pieces every decoder needs: weights as function parameters
(registered once, in a fixed order, so every compiled function takes the same weight list), norms, RoPE, and
attention with an optional KV cache; the linears and the LM head come from `frontend.linears.LinearEmitter`.

Design (after MLC-LLM's LLaMA, simplified to batch 1):
- `forward_all(ids[1, n], pos[n], *weights) -> logits[1, n, V]`: no cache; used for perplexity.
- `prefill(ids[1, n], pos[n], caches, *weights) -> logits[1, 1, V]`: appends this chunk's K/V to the caches
  (TVM's `vm.builtin.attention_kv_cache_*` objects, mutated in place) and attends over everything cached;
  `decode` is the same graph with n = 1 static, so the kernels' GEMV schedules apply and attention runs the
  one-query kernel `tir_ops.attention_decode` (INT8: bit for bit the blocked kernel's result, ~2x faster).
- `create_kv_cache() -> caches`: one K and one V cache per layer, int8 (k8/v8 per the contract) when the checkpoint
  quantizes attention, float32 otherwise.
`pos` holds the absolute positions of the n tokens (the runtime passes arange(past, past + n)); RoPE, OPT's learned
positions and the causal mask read it, so no shape arithmetic is needed in the graph.

Token pruning (a checkpoint or export with a pruning schedule, `checkpoint.PruneSchedule`): forward_all and prefill
take one more input after `pos` (and the caches), `prune_counts` int64 [m], the tokens kept before each of the m
pruning layers, which the runtime computes with `agile_tvm.prune_schedule.schedule_counts`; they become symbolic row
counts, so the layers after a pruning layer run on fewer rows. Per pruning layer l (`begin_layer`): layer l-1's
attention also writes its first-key probabilities p^[i, h, 0] (`tir_ops.attention_blocked(first_probs=True)`),
`tir_ops.prune_select` turns them into the kept row indices as the reference does, and the rows of the hidden state,
the positions and any per-row tables (RoPE) are gathered; the hidden state before the gather is written into a full
[n, hidden] state (`tir_ops.scatter_rows`), so a pruned token keeps its last hidden state to the final norm and the
head (`end_layers`). Positions stay the original ones (RoPE; BLOOM's ALiBi reads the kept keys' positions); the
causal mask compares row order, which pruning preserves. forward_all then returns (logits, kept positions [k] int32
of the last layer). Layers that do not prune run as without pruning; without a schedule the module is built as
before. After a pruned prefill each layer's KV cache holds the tokens that layer processed; decode appends to it.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from tvm import relax, tirx

from agile_tvm.errors import UserError
from agile_tvm.frontend import tir_ops
from agile_tvm.frontend.checkpoint import Checkpoint, PruneSchedule
from agile_tvm.frontend.linears import HEAD, LinearEmitter

R = relax.op


class WeightTable:
    """Named weight arrays in registration order; each Relax function gets its own Var per weight."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self._vars: dict[str, relax.Var] = {}

    def begin_function(self):
        self._vars = {}

    def var(self, name: str, array: np.ndarray | None = None) -> relax.Var:
        if name not in self.arrays:
            if array is None:
                raise KeyError(name)
            self.arrays[name] = np.array(array, order="C", copy=True)  # ascontiguousarray would make 0-d 1-d
        if name not in self._vars:
            arr = self.arrays[name]
            self._vars[name] = relax.Var(name.replace(".", "_"), relax.TensorType(list(arr.shape), str(arr.dtype)))
        return self._vars[name]

    def function_params(self) -> list[relax.Var]:
        """Every weight's Var in registration order (unused ones too, so all functions share one signature)."""
        return [self.var(name) for name in self.arrays]


def kernels_module():
    """`agile_tvm.kernels`: every linear (integer and float) runs on its scheduled kernels; its functions are
    looked up when first used, so a checkpoint that needs none of the v2 kernels builds without them."""
    import agile_tvm.kernels as kernels
    from agile_tvm.kernels import fp32

    return SimpleNamespace(integer=kernels, fp32=fp32)


def with_num_inputs(mod: relax.IRModule, num_inputs: dict[str, int]) -> relax.IRModule:
    """Mark each function's leading `num_inputs[name]` parameters as its inputs (Relax's "num_input" attribute), so
    VMShapeLower checks only those at every call and skips the static-shape weights after them. Unmarked, a SmolLM2
    decode step ran ~1,600 `check_tensor_info`/`match_shape` builtins on its 759 weights (cheap: no measurable
    speed difference, but work proportional to the weights on every token); the runtime checks the weights' shapes
    once when it loads them instead (`runtime.CompiledLM._load_weights`)."""
    for name, count in num_inputs.items():
        gv = mod.get_global_var(name)
        mod[gv] = mod[gv].with_attr("num_input", count)
    return mod


def drop_unused_weights(mod: relax.IRModule, weights: "WeightTable", num_inputs: dict[str, int]) -> relax.IRModule:
    """Remove the weights that no function reads, from every function's parameters and from `weights`.

    Packing registers every array a linear might need (`LinearEmitter._packed_arrays`), but which ones a kernel
    reads is decided later: the decode GEMV with the zero point in its dot and the integer-scale prefill GEMM read
    no row sums, and an embedding read from the INT8 LM head leaves the float table unread. Stored anyway, they
    were ~13 MB of SmolLM2's module that nothing loads into a register; every function keeps one shared signature
    (a weight is kept if any function reads it)."""
    names = list(weights.arrays)
    used = set()
    for fname, count in num_inputs.items():
        func = mod[fname]
        if len(func.params) - count != len(names):
            raise RuntimeError(f"{fname} takes {len(func.params) - count} weights, the table has {len(names)}")
        free = set(relax.analysis.free_vars(func.body))  # Vars hash and compare by identity
        used.update(i for i, param in enumerate(func.params[count:]) if param in free)
    if len(used) == len(names):
        return mod
    for fname, count in num_inputs.items():
        gv = mod.get_global_var(fname)
        func = mod[gv]
        params = list(func.params[:count]) + [p for i, p in enumerate(func.params[count:]) if i in used]
        mod[gv] = relax.Function(params, func.body, func.ret_ty, func.is_pure, func.attrs, func.span)
    for i, name in enumerate(names):
        if i not in used:
            del weights.arrays[name]
    return mod


#: kernels that gather a few rows of a weight table (one per token) rather than read all of it
GATHER_KERNELS = ("embed", "rope", "take")


def decode_weight_bytes(mod: relax.IRModule, weights: "WeightTable") -> int:
    """Bytes of weights one decode step reads in full: every weight passed to a kernel of the decode function,
    except tables it only gathers a row from (`GATHER_KERNELS`: embedding, RoPE). With the KV cache read on top,
    this is what bounds decode on a memory-bound CPU (`agile-tvm bench` reports it with the achieved GB/s)."""
    func = mod["decode"]
    index = {param: name for param, name in zip(func.params[int(func.attrs["num_input"]):], weights.arrays)}
    read = set()
    for block in func.body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not isinstance(call, relax.Call):
                continue
            op_name = getattr(call.op, "name", None) or getattr(call.op, "name_hint", "")
            if op_name == "relax.call_tir":
                if call.args[0].name_hint.startswith(GATHER_KERNELS):
                    continue
                args = list(call.args[1].fields)
            else:
                if "take" in op_name:
                    continue
                args = list(call.args)
            read.update(index[a] for a in args if a in index)
    return sum(weights.arrays[name].nbytes for name in read)


class PruneState:
    """Token pruning while one function is emitted: which rows are still processed and which tokens they are."""

    def __init__(self, counts: dict, pos, n_all):
        self.counts = counts  # pruning layer -> symbolic count of the rows it keeps
        self.pos = pos  # original positions of the rows still processed, int32 [rows]
        self.n_all = n_all  # tokens of the sequence
        self.layer = -1  # the decoder layer being emitted
        self.first_probs = None  # [rows, heads]: the last attention's probabilities of the first key
        self.full = None  # [n_all, hidden]: every token's last hidden state, from the first pruning layer on

    def prunes(self, layer: int) -> bool:
        return layer in self.counts

    @property
    def started(self) -> bool:
        return self.full is not None


class GraphBuilder(LinearEmitter):
    """Emits one decoder's Relax functions from a checkpoint (linears and the LM head: `LinearEmitter`)."""

    def __init__(self, ckpt: Checkpoint, max_seq_len: int, target="host", pruning: PruneSchedule | None = None):
        from agile_tvm.targets import get_target

        self.ckpt = ckpt
        self.target = get_target(target if target is not None else "host")
        self.kernels = kernels_module()
        self.bb = relax.BlockBuilder()
        self.weights = WeightTable()
        self.max_seq_len = int(max_seq_len)
        self._funcs: dict[str, relax.GlobalVar] = {}
        self._act_cache: dict = {}
        self.n = None
        self.taps: list | None = None  # [] (`build_module(..., taps=True)`): forward_all also returns `tap`ped values
        self.tap_names: list[str] = []
        self._function = None
        self.pruning = pruning
        self._prune: PruneState | None = None  # set while a function that prunes is emitted

    # ---- infrastructure -------------------------------------------------------------------------------------
    def tir(self, key: str, func) -> relax.GlobalVar:
        """Add a kernel once; marked opaque (op_pattern 8) so FuseOps never merges it with a neighbouring reshape
        (FuseTIR cannot map a kernel's buffer onto a reshaped view) and its schedule stays as written."""
        if key not in self._funcs:
            self._funcs[key] = self.bb.add_func(func.with_attr("op_pattern", 8), key)
        return self._funcs[key]

    @property
    def row_parallel(self) -> bool:
        """Whether the row kernels (norms, RoPE, SwiGLU, the Q/K/V quantizer) run their rows on the thread pool: not
        in the decode function, whose single row made each of them a thread-pool round trip for one small task
        (7 of a decoder layer's 11 parallel regions)."""
        return not (isinstance(self.n, int) and self.n == 1)

    @property
    def row_suffix(self) -> str:
        """Kernel-name suffix of the serial row kernels (`row_parallel` False)."""
        return "" if self.row_parallel else "_serial"

    def tap(self, name: str, value) -> None:
        """Tests and debugging: with taps on, forward_all also returns `value` (after the logits), named in
        `tap_names`; e.g. every integer linear taps its input as "P:in"."""
        if self.taps is not None and self._function == "forward_all":
            self.taps.append(value)
            self.tap_names.append(name)

    def emit(self, expr, name: str | None = None):
        return self.bb.emit(expr, name_hint=name or "")

    def w(self, name: str, array: np.ndarray | None = None) -> relax.Var:
        """The Var of a stored weight; loads it from the checkpoint (float32) unless `array` is given."""
        if array is None and name not in self.weights.arrays:
            array = self.ckpt.tensor(name)
        return self.weights.var(name, array)

    def scalar(self, name: str, value, dtype: str) -> relax.Var:
        return self.w(name, np.asarray(value, dtype=dtype).reshape(1))

    def has(self, name: str) -> bool:
        return name in self.ckpt.tensors

    # ---- layers -----------------------------------------------------------------------------------------------
    def rms_norm(self, x, weight: str, eps: float):
        """LLaMA's RMSNorm of x [n, width]: the frontend's row kernel (`tir_ops.rms_norm`, bit for bit Relax's
        legalized op and ~6x faster at 512 x 576), or R.nn.rms_norm for a width it does not vectorize."""
        width = int(x.ty.shape[-1])
        if width % tir_ops.RMS_NORM_LANES:
            return self.emit(R.nn.rms_norm(x, self.w(weight), axes=[-1], epsilon=eps))
        eps_key = repr(float(eps)).replace(".", "p").replace("-", "m")  # a valid symbol name: 1e-05 -> 1em05
        gv = self.tir(f"rms_norm_{width}_{eps_key}{self.row_suffix}",
                      tir_ops.rms_norm(width, float(eps), parallel=self.row_parallel))
        return self.emit(relax.call_tir(gv, [x, self.w(weight)], relax.TensorType(x.ty.shape, "float32")))

    def add_rms_norm(self, x, y, weight: str, eps: float):
        """(x + y, rms_norm(x + y)): a residual add and the norm after it in one kernel (`tir_ops.add_rms_norm`, bit
        for bit R.add then `rms_norm`), or the two ops for a width the kernel does not vectorize."""
        width = int(x.ty.shape[-1])
        if width % tir_ops.RMS_NORM_LANES:
            total = self.emit(R.add(x, y))
            return total, self.rms_norm(total, weight, eps)
        eps_key = repr(float(eps)).replace(".", "p").replace("-", "m")
        gv = self.tir(f"add_rms_norm_{width}_{eps_key}{self.row_suffix}",
                      tir_ops.add_rms_norm(width, float(eps), parallel=self.row_parallel))
        ty = relax.TensorType(x.ty.shape, "float32")
        both = self.emit(relax.call_tir(gv, [x, y, self.w(weight)], [ty, ty]))
        return self.emit(relax.TupleGetItem(both, 0)), self.emit(relax.TupleGetItem(both, 1))

    def layer_norm(self, x, prefix: str, eps: float):
        return self.emit(R.nn.layer_norm(x, self.w(prefix + ".weight"), self.w(prefix + ".bias"), axes=[-1],
                                         epsilon=eps))

    def head_weight(self, embed_name: str, head_name: str = "lm_head.weight") -> tuple[str, bool]:
        """(name of the float LM head weight, whether it is tied to the embedding): a stored head equal to the
        embedding counts as tied, so the table is stored once. A quantized head (`lm_head` in `linears`) has its
        own codes, so the embedding is never tied to it."""
        if HEAD in self.ckpt.linears:
            return head_name, False
        if not self.has(head_name):
            return embed_name, True
        if np.array_equal(self.ckpt.tensor(head_name), self.ckpt.tensor(embed_name)):
            return embed_name, True
        return head_name, False

    def embed(self, ids_flat, weight: str, tied_head: bool = False):
        """Token embedding, stored once and no wider than exact: with a tied float LM head, rows of the head's packed
        FP32 table; with an INT8 head whose products equal the table, rows of its codes times its scales
        (`embedding_from_head`); else the table in 16 bits where that is exact (`tir_ops.narrow_table`), or
        float32."""
        out_ty = relax.TensorType([self.n, self.ckpt.tensor(weight).shape[1]], "float32")
        par = self.row_parallel
        if tied_head:
            table = self.ckpt.tensor(weight)
            packed_name = weight + ".fp32pack"
            if packed_name not in self.weights.arrays:
                self.weights.var(packed_name, self.kernels.fp32.pack_fp32_weights(table, self.target))
            blocks, hidden, nb = self.weights.arrays[packed_name].shape
            gv = self.tir(f"embed_packed_{blocks}_{hidden}_{nb}", tir_ops.embed_packed(blocks, hidden, nb))
            return self.emit(relax.call_tir(gv, [ids_flat, self.w(packed_name)], out_ty))
        from_head = self.embedding_from_head(weight)
        if from_head is not None:
            codes, scales = (self.weights.arrays[name] for name in from_head)
            blocks, kblocks, nb, kk = codes.shape
            groups = scales.shape[1]
            gv = self.tir(f"embed_codes_{blocks}_{kblocks}_{nb}_{kk}_{codes.dtype}_{groups}_{scales.dtype}"
                          f"{self.row_suffix}", tir_ops.embed_codes(blocks, kblocks, nb, kk, str(codes.dtype), groups,
                                                                    str(scales.dtype), parallel=par))
            return self.emit(relax.call_tir(gv, [ids_flat, *(self.w(name) for name in from_head)], out_ty))
        stored_name = self.__dict__.setdefault("_embedding_storage", {}).get(weight)
        if stored_name is None:
            array, storage = tir_ops.narrow_table(self.ckpt.tensor(weight))
            stored_name = weight if storage == "float32" else f"{weight}.{storage}"
            self.weights.var(stored_name, array)
            self._embedding_storage[weight] = stored_name
        if stored_name == weight:
            return self.emit(R.take(self.w(weight), ids_flat, axis=0))
        storage = stored_name.rsplit(".", 1)[1]
        vocab, hidden = self.weights.arrays[stored_name].shape
        gv = self.tir(f"embed_{storage}_{vocab}_{hidden}{self.row_suffix}",
                      tir_ops.embed_narrow(vocab, hidden, storage, parallel=par))
        return self.emit(relax.call_tir(gv, [ids_flat, self.w(stored_name)], out_ty))

    def rope_at(self, x, cos_table: str, sin_table: str, pos, heads: int, head_dim: int):
        """HF LLaMA RoPE of x [n, heads * head_dim] at positions pos [n] (int32), reading the stored cos/sin tables
        [max_len, head_dim] (`tir_ops.rope`: bit for bit `rope` below, ~10x faster). Returns [n, heads, head_dim]."""
        max_len = int(self.weights.arrays[cos_table].shape[0])
        gv = self.tir(f"rope_{heads}_{head_dim}_{max_len}{self.row_suffix}",
                      tir_ops.rope(heads, head_dim, max_len, parallel=self.row_parallel))
        return self.emit(relax.call_tir(gv, [x, self.w(cos_table), self.w(sin_table), pos],
                                        relax.TensorType([self.n, heads, head_dim], "float32")))

    def row_positions(self, pos):
        """The original positions of the rows still processed: `pos` itself, or the kept ones under pruning."""
        return self._prune.pos if self._prune is not None else pos

    @property
    def fuses_next_norm(self) -> bool:
        """Whether a layer's last residual add may also norm for the next layer (`add_rms_norm`): not while pruning,
        where the next layer may first gather or scatter rows."""
        return self._prune is None

    def rope(self, x, cos, sin, heads: int, head_dim: int):
        """HF LLaMA RoPE (rotate_half layout): x * cos + rotate_half(x) * sin, x [n, H, D], cos/sin [n, 1, D]."""
        half = head_dim // 2
        x1 = self.emit(R.strided_slice(x, axes=[2], begin=[0], end=[half]))
        x2 = self.emit(R.strided_slice(x, axes=[2], begin=[half], end=[head_dim]))
        rot = self.emit(R.concat([R.negative(x2), x1], axis=2))
        return self.emit(R.add(R.multiply(x, cos), R.multiply(rot, sin)))

    def attention(self, q, k, v, layer_prefix: str, heads: int, kv_heads: int, head_dim: int, cache=None,
                  slopes: np.ndarray | None = None):
        """Causal attention; k/v are this chunk's [n, KVH, D] float32, q its [self.n, H, D] queries (the last n,
        or only the last one after `keep_last_row`). Returns ([self.n, H*D], updated caches).
        With token pruning it also writes the first-key probabilities when the next layer prunes (`begin_layer`
        reads them) and gives ALiBi the kept keys' original positions."""
        n = self.n
        nk = k.ty.shape[0]  # this chunk's keys: every row, also when only the last query is kept
        quant = layer_prefix in self.ckpt.attention
        if quant:
            info = self.ckpt.attention[layer_prefix]
            if int(info.get("qk_bits", 8)) != 8 or int(info.get("v_bits", 8)) != 8:
                raise UserError(f"{layer_prefix}: only 8-bit Q/K/V attention is supported by the frontend")
            bits = int(info.get("softmax_bits", 4))
            scales = np.array([float(self.ckpt.tensor(layer_prefix + s)) for s in (".q_scale", ".k_scale", ".v_scale")],
                              np.float32)
            sc = self.w(layer_prefix + ".qkv_scale", scales)
            c = kv_heads * head_dim
            gv = self.tir(f"quant_sym_int8_{c}{self.row_suffix}", tir_ops.quant_sym_int8(c, parallel=self.row_parallel))
            ks = self.w(layer_prefix + ".k_scale1", scales[1:2])
            vs = self.w(layer_prefix + ".v_scale1", scales[2:3])
            k2 = self.emit(R.reshape(k, [nk, c]))
            v2 = self.emit(R.reshape(v, [nk, c]))
            k = self.emit(R.reshape(self.emit(relax.call_tir(gv, [k2, ks], relax.TensorType([nk, c], "int8"))),
                                    [nk, kv_heads, head_dim]))
            v = self.emit(R.reshape(self.emit(relax.call_tir(gv, [v2, vs], relax.TensorType([nk, c], "int8"))),
                                    [nk, kv_heads, head_dim]))
            kv_dtype = "int8"
        else:
            bits = 4
            sc = self.w("attn_unit_scale", np.ones(3, np.float32))
            kv_dtype = "float32"
        new_cache = None
        if cache is not None:
            kc, vc = cache
            kc = self.emit(R.call_inplace_packed("vm.builtin.attention_kv_cache_append", kc, k, inplace_indices=[0],
                                                 ty_args=[relax.ObjectType()]))
            vc = self.emit(R.call_inplace_packed("vm.builtin.attention_kv_cache_append", vc, v, inplace_indices=[0],
                                                 ty_args=[relax.ObjectType()]))
            m = tirx.Var("m", "int64")
            kall = self.emit(R.call_pure_packed("vm.builtin.attention_kv_cache_view", kc,
                                                ty_args=[relax.TensorType(ndim=3, dtype=kv_dtype)]))
            vall = self.emit(R.call_pure_packed("vm.builtin.attention_kv_cache_view", vc,
                                                ty_args=[relax.TensorType(ndim=3, dtype=kv_dtype)]))
            k = self.bb.match_cast(kall, relax.TensorType([m, kv_heads, head_dim], kv_dtype))
            v = self.bb.match_cast(vall, relax.TensorType([m, kv_heads, head_dim], kv_dtype))
            new_cache = (kc, vc)
        alibi = slopes is not None
        sl = self.w("alibi_slopes" if alibi else "no_alibi", slopes if alibi else np.zeros(heads, np.float32))
        prune = self._prune
        first_probs = prune is not None and prune.prunes(prune.layer + 1)
        key_positions = alibi and prune is not None and prune.started  # keys no longer sit at their row index
        int16_dot = self._has_pmaddwd()
        if self._uses_decode_attention(head_dim, first_probs, key_positions):
            int16_dot = int16_dot and head_dim % 16 == 0
            gv = self.tir(f"attention_decode_{heads}_{kv_heads}_{head_dim}_{kv_dtype}_{bits}"
                          f"{'_alibi' if alibi else ''}{'_i16' if int16_dot else ''}",
                          tir_ops.attention_decode(heads, kv_heads, head_dim, kv_dtype, bits, alibi, parallel=True,
                                                   int16_dot=int16_dot))
        else:
            gv = self.tir(f"attention_{heads}_{kv_heads}_{head_dim}_{kv_dtype}_{bits}{'_alibi' if alibi else ''}"
                          f"{'_p0' if first_probs else ''}{'_kpos' if key_positions else ''}"
                          f"{'_i16' if int16_dot else ''}",
                          tir_ops.attention_blocked(heads, kv_heads, head_dim, kv_dtype, bits, alibi,
                                                    first_probs=first_probs, key_positions=key_positions,
                                                    int16_dot=int16_dot))
        args = [q, k, v, sc, sl] + ([prune.pos] if key_positions else [])
        out_ty = relax.TensorType([n, heads, head_dim], "float32")
        if first_probs:
            both = self.emit(relax.call_tir(gv, args, [out_ty, relax.TensorType([n, heads], "float32")]))
            out = self.emit(relax.TupleGetItem(both, 0))
            prune.first_probs = self.emit(relax.TupleGetItem(both, 1))
            self.tap(f"{layer_prefix}:first_probs", prune.first_probs)
        else:
            out = self.emit(relax.call_tir(gv, args, out_ty))
        return self.emit(R.reshape(out, [n, heads * head_dim])), new_cache

    def last_row_only(self, last_only: bool, layer: int, num_layers: int) -> bool:
        """Whether from the attention of decoder layer `layer` on, the function needs only its last row: in the
        last layer of prefill (`last_only`: it returns the last token's logits), every token's K and V still go
        to the cache, but only the last token's query, attention output, MLP and norms reach the logits (as
        llama.cpp computes only its output rows there). Not while pruning (the rows are gathered by then), not in
        decode (one row already)."""
        return last_only and layer == num_layers - 1 and self._prune is None and not isinstance(self.n, int)

    def keep_last_row(self, *tensors):
        """The last row of each [n, ...] tensor; the function continues with one row (the m = 1 kernels)."""
        n = self.n
        rows = tuple(self.emit(R.strided_slice(t, axes=[0], begin=[n - 1], end=[n])) for t in tensors)
        self.n = 1
        return rows

    def _has_pmaddwd(self) -> bool:
        """Whether the target has AVX2's pmaddwd, which the INT8 Q.K of both attention kernels uses (`int16_dot`)."""
        from agile_tvm.targets import isa_of

        return isa_of(self.target) in ("avx2", "avx512")

    def _uses_decode_attention(self, head_dim: int, first_probs: bool, key_positions: bool) -> bool:
        """Whether this attention runs `tir_ops.attention_decode`: one static query (the decode function), a head
        size it vectorizes, and no pruning outputs (decode never prunes). Its INT8 results equal the blocked
        kernel's bit for bit, so decode still matches prefill and forward_all."""
        return (isinstance(self.n, int) and self.n == 1 and head_dim % tir_ops.DECODE_LANES == 0
                and not first_probs and not key_positions)

    # ---- token pruning --------------------------------------------------------------------------------------------
    def begin_layer(self, layer: int, x, *rows):
        """Call at the top of decoder layer `layer` with its input x [rows, hidden] and any per-row tables (RoPE's
        cos/sin); returns them gathered to the kept rows when this layer prunes, as they were otherwise."""
        prune = self._prune
        if prune is None:
            return (x, *rows)
        prune.layer = layer
        if not prune.prunes(layer):
            return (x, *rows)
        hidden = int(x.ty.shape[1])
        if prune.full is None:  # the first pruning layer: every row is still present, in order
            prune.full = x
        else:
            prune.full = self._scatter_rows(prune.full, prune.pos, x, prune.n_all, hidden)
        heads = int(prune.first_probs.ty.shape[1])
        gv = self.tir(f"prune_select_{heads}", tir_ops.prune_select(heads))
        k = prune.counts[layer]
        both = self.emit(relax.call_tir(gv, [prune.first_probs, prune.pos], [relax.TensorType([k], "int32")] * 2))
        idx = self.emit(relax.TupleGetItem(both, 0))
        prune.pos = self.emit(relax.TupleGetItem(both, 1))
        self.n = k
        self.tap(f"layer{layer}:kept", prune.pos)
        return tuple(self.emit(R.take(t, idx, axis=0)) for t in (x, *rows))

    def end_layers(self, x):
        """After the last decoder layer: the last hidden state of every token, [n, hidden] (x itself without
        pruning)."""
        prune = self._prune
        if prune is None or prune.full is None:
            return x
        self.n = prune.n_all
        return self._scatter_rows(prune.full, prune.pos, x, prune.n_all, int(x.ty.shape[1]))

    def _scatter_rows(self, full, rows, x, n_all, hidden: int):
        gv = self.tir(f"scatter_rows_{hidden}", tir_ops.scatter_rows(hidden))
        return self.emit(relax.call_tir(gv, [full, rows, x], relax.TensorType([n_all, hidden], "float32")))

    def _prune_state(self, counts, pos, n) -> "PruneState":
        """The pruning state of one function; `counts` (int64 [m]) becomes one symbolic row count per pruning
        layer."""
        ks = [tirx.Var(f"kept_{layer}", "int64") for layer in self.pruning.layers]
        # a VM-allocated copy first: over RPC an input tensor reaches tensor_to_shape as a bare DLTensor it rejects
        own = self.emit(R.add(counts, relax.const(0, "int64")))
        self.bb.match_cast(self.emit(R.tensor_to_shape(own)), relax.ShapeType(ks))
        return PruneState(counts=dict(zip(self.pruning.layers, ks)), pos=pos, n_all=n)

    # ---- functions ----------------------------------------------------------------------------------------------
    def build(self, model) -> relax.IRModule:
        """Emit forward_all, forward and create_kv_cache for `model` (an architecture builder)."""
        num_inputs = {}
        for name, cached, static_n in (("forward_all", False, None), ("prefill", True, None), ("decode", True, 1)):
            self._function = name
            self.weights.begin_function()
            self._act_cache = {}
            n = tirx.Var("n", "int64") if static_n is None else static_n
            self.n = n
            ids = relax.Var("ids", relax.TensorType([1, n], "int32"))
            pos = relax.Var("pos", relax.TensorType([n], "int32"))
            inputs = [ids, pos]
            caches = None
            if cached:
                caches = relax.Var("caches", relax.TupleType([relax.ObjectType()] * (2 * model.num_layers)))
                inputs.append(caches)
            counts = None
            if self.pruning is not None and static_n is None:  # decode: one token, nothing to prune
                counts = relax.Var("prune_counts", relax.TensorType([len(self.pruning.layers)], "int64"))
                inputs.append(counts)
            with self.bb.function(name):
                # one dataflow block: Relax only fuses elementwise ops and turns reshapes into views inside one
                with self.bb.dataflow():
                    ids_flat = self.emit(R.reshape(ids, [n]))
                    self._prune = self._prune_state(counts, pos, n) if counts is not None else None
                    cache_pairs = None
                    if cached:
                        cache_pairs = [(self.emit(relax.TupleGetItem(caches, 2 * i)),
                                        self.emit(relax.TupleGetItem(caches, 2 * i + 1)))
                                       for i in range(model.num_layers)]
                    logits, _ = model.emit(self, ids_flat, pos, cache_pairs, last_only=cached)
                    # The caches are appended in place (mutable runtime objects), so only logits are returned: a
                    # returned tuple would come back over RPC as an opaque handle the client cannot index.
                    out = logits
                    kept = [self._prune.pos] if self._prune is not None and not cached else []
                    if kept or (self.taps and not cached):
                        out = relax.Tuple([logits, *kept, *(self.taps or [])])
                    out = self.bb.emit_output(out)
                self.taps = [] if self.taps is not None else None
                self.bb.emit_func_output(out, params=inputs + self.weights.function_params())
            num_inputs[name] = len(inputs)
        self._function = None
        self._prune = None
        self.weights.begin_function()
        with self.bb.function("create_kv_cache", params=[]):
            shape = [self.max_seq_len, model.num_kv_heads, model.head_dim]
            kv_dtype = model.kv_dtype(self.ckpt)
            items = []
            # reserve max_seq_len rows; the one-row init tensor is discarded at once (fill count 0)
            init = self.emit(R.zeros(relax.ShapeExpr([1, *shape[1:]]), kv_dtype))
            for _ in range(2 * model.num_layers):
                items.append(self.emit(R.call_pure_packed(
                    "vm.builtin.attention_kv_cache_create", init, relax.ShapeExpr(shape), relax.prim_value(0),
                    ty_args=[relax.ObjectType()])))
            self.bb.emit_func_output(relax.Tuple(items))
        return with_num_inputs(drop_unused_weights(self.bb.get(), self.weights, num_inputs), num_inputs)
