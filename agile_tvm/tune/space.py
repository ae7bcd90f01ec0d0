"""The search space per workload and target.

"hand" (the default for the kernels): the kernels' hand schedule with each value of its free parameters (tiles per
panel; for grouped weights the row-wise form, or the chunked form with each K chunk count) as one design space;
MetaSchedule's evolutionary search draws from them and the XGBoost cost model picks what to measure next.
The parameters are concrete in each design space, not `sample_perfect_tile` decisions: a trace is then valid
for every point by construction (a mutated tile count of 1 can make `compute_at` drop a unit loop that a later
`GetLoops` of the trace expects), and the space is small (at most `HAND_SPACE_MAX` points): a few dozen trials
cover it. The hand choice is one of its points, so a tuned record can only beat it or be held back at export.
A trace holds only the hand schedule's instructions, none of which depends on M, so one tuned on a static-M
proxy replays on the symbolic-M prefill kernel (`records.replayed_func`).

"generic": MetaSchedule's LLVM rules plus auto-tensorization with the kernels' own dot-product intrinsics on
packed weights. Measured on SmolLM2's decode GEMVs (Zen 3, 64 trials each): 0.09-0.15x the hand schedule; kept for
the plain matmuls (plumbing tests), which have no hand schedule. Auto-tensorizing is only offered for the
packed-weight linear kernels: on a plain [N, K] weight TVM accepts the tensorization and computes wrong results
(notes), so plain matmuls get the untensorized rules.
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


SPACES = ("hand", "generic")


def space_for(workload, target, spec: dict | None = None, space: str = "hand"):
    """The design space generator of a `workloads.Workload`: "hand" for a kernel, "generic" for a plain matmul or
    when asked."""
    if space not in SPACES:
        from agile_tvm.errors import UserError

        raise UserError(f"unknown search space {space!r}: use one of {', '.join(SPACES)}")
    if space == "hand" and workload.info is not None:
        return hand_space(workload.info)
    return space_generator(workload.name, target, spec)


#: The tile counts per panel a tuned schedule may pick: the GEMV keeps up to 8 accumulators in flight; the GEMM's
#: int32 and float tiles of 4 already take 8 of AVX2's 16 vector registers.
MAX_TILES = {"gemv": 8, "gemm": 4}
HAND_SPACE_MAX = 64


def hand_points(info: dict) -> list[dict]:
    """The `kernels.schedule.schedule_linear` parameters of the hand space for a kernel with schedule parameters
    `info`, the hand choice first."""
    nblocks = info["n_pad"] // info["nb"]
    most = MAX_TILES["gemv" if info["m"] == 1 else "gemm"]
    tiles = [nt for nt in range(1, most + 1) if nblocks % nt == 0]
    points = [{}]  # the hand choice
    if not info["grouped"]:
        points += [{"nt": nt} for nt in tiles]
    else:
        G = info["G"]
        points += [{"nt": nt, "chunked": False} for nt in tiles]
        points += [{"nt": nt, "chunked": True, "chunks": c} for c in range(1, G + 1) if G % c == 0 for nt in tiles]
    return points[:HAND_SPACE_MAX]


def hand_space(info: dict):
    """The hand schedule's own space for a kernel with schedule parameters `info` (module doc)."""
    from tvm.s_tir import meta_schedule as ms

    from agile_tvm.kernels.schedule import schedule_linear

    def design_spaces(sch):
        spaces = []
        for params in hand_points(info):
            point = sch.copy()
            schedule_linear(None, info, sch=point, **params)
            spaces.append(point)
        return spaces

    return ms.space_generator.ScheduleFn(design_spaces, sch_rules=[], postprocs=[],
                                         mutator_probs={ms.mutator.MutateTileSize(): 1.0})


def space_generator(workload_name: str, target, spec: dict | None = None):
    """The "generic" space (module doc)."""
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
