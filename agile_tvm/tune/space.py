"""The search space per workload and target: MetaSchedule's LLVM rules plus auto-tensorization with the kernels'
own dot-product intrinsics on packed weights.

Auto-tensorizing is only offered for the packed-weight linear kernels: on a plain [N, K] weight TVM accepts the
tensorization and computes wrong results (notes), so plain matmuls get the untensorized rules.
"""

from __future__ import annotations


def dot_intrinsic(workload_name: str, target, spec: dict | None = None) -> str | None:
    """The `agile_*` intrinsic MetaSchedule may tensorize a linear workload with on `target`, if any.

    A frontend kernel (`spec` of `workloads.frontend_kernels`) is offered the intrinsic its hand schedule uses:
    the nibble unpack + pmaddubsw step for 4-bit nibble weights, vpsignb + vpmaddubsw for int8 tiles with signed
    activations (the INT8 LM head), the plain dot step otherwise."""
    if spec is not None:
        return _kernel_intrinsic(spec, target)
    if not workload_name.startswith(("w4a8_", "w8a8_")):
        return None
    try:
        from agile_tvm.kernels import intrin
        from agile_tvm.targets import isa_of
    except ImportError:
        return None
    key = (isa_of(target), 8 if workload_name.startswith("w4a8_") else 16)
    entry = intrin.DOT_INTRINSICS.get(key)
    return entry[0] if entry else None


def _kernel_intrinsic(spec: dict, target) -> str | None:
    try:
        from agile_tvm.kernels import intrin, layout
        from agile_tvm.targets import isa_of
    except ImportError:
        return None
    isa, wbits, wfmt = isa_of(target), int(spec["wbits"]), spec["options"].get("wfmt")
    if wfmt == "nibble":
        entry = intrin.NIBBLE_INTRINSICS.get(isa)
    elif layout.signed_x86_w8(isa, wbits, wfmt):
        entry = intrin.SIGNED_X86_INTRINSICS.get(isa)
    else:
        entry = intrin.DOT_INTRINSICS.get((isa, 8 if wbits == 4 else 16))
    return entry[0] if entry else None


def space_generator(workload_name: str, target, spec: dict | None = None):
    from tvm.s_tir import meta_schedule as ms

    rules = list(ms.schedule_rule.ScheduleRule.create("llvm"))
    postprocs = list(ms.postproc.Postproc.create("llvm"))
    name = dot_intrinsic(workload_name, target, spec)
    tiling = next(i for i, r in enumerate(rules) if "MultiLevelTiling" in str(r))
    write = ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global")
    if spec is not None:
        # The frontend kernels' outputs read two producers (the float tile and the per-row scale that the
        # in-kernel quantizer computes); the write-reuse fusion reverse-computes the output under the tile's
        # loops and MetaSchedule aborts the whole task ("requires all the producer(s) ... under the target loop").
        write = ms.schedule_rule.ReuseType(req="no", levels=[], scope="global")
        rules[tiling] = ms.schedule_rule.MultiLevelTiling(structure="SSRSRS", max_innermost_factor=64,
                                                          reuse_write=write)
    if name is not None:
        rules.insert(tiling, ms.schedule_rule.MultiLevelTilingWithIntrin(
            name, structure="SSRSRS", max_innermost_factor=64, reuse_write=write))
        postprocs.append(ms.postproc.RewriteTensorize(vectorize_init_loop=True))
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs, mutator_probs="llvm")
