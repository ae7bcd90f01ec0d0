"""The search space per workload and target: MetaSchedule's LLVM rules plus auto-tensorization with the kernels'
own dot-product intrinsics on packed weights.

Auto-tensorizing is only offered for the packed-weight linear kernels: on a plain [N, K] weight TVM accepts the
tensorization and computes wrong results (notes), so plain matmuls get the untensorized rules.
"""

from __future__ import annotations


def dot_intrinsic(workload_name: str, target) -> str | None:
    """The `agile_*` intrinsic MetaSchedule may tensorize a linear workload with on `target`, if any."""
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


def space_generator(workload_name: str, target):
    from tvm.s_tir import meta_schedule as ms

    rules = list(ms.schedule_rule.ScheduleRule.create("llvm"))
    postprocs = list(ms.postproc.Postproc.create("llvm"))
    name = dot_intrinsic(workload_name, target)
    if name is not None:
        tiling = next(i for i, r in enumerate(rules) if "MultiLevelTiling" in str(r))
        rules.insert(tiling, ms.schedule_rule.MultiLevelTilingWithIntrin(
            name, structure="SSRSRS", max_innermost_factor=64,
            reuse_write=ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global")))
        postprocs.append(ms.postproc.RewriteTensorize(vectorize_init_loop=True))
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs, mutator_probs="llvm")
