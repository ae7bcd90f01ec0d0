"""Named compilation targets for agile-tvm.

TVM 0.27 only accepts targets as dicts/JSON (a CLI string such as ``"llvm -mcpu=..."`` is rejected), so every
device agile-tvm knows is spelled out here once. ``host`` is detected from the running CPU so the same code picks
AVX-512 on a Skylake server and AVX2 on a Zen 3 laptop.

The kernel schedules (``agile_tvm.kernels``) dispatch on :func:`isa_of`, which reduces a target to the one fact
that decides the tensorization: which integer dot-product instructions it has.
"""

from __future__ import annotations

import functools

#: Target dicts, usable with ``tvm.target.Target(TARGETS[name])``.
TARGETS: dict[str, dict] = {
    # Skylake-SP: AVX-512BW (pmaddubsw/pmaddwd on zmm), no VNNI.
    "x86-avx512": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"},
    # Any Haswell-or-later x86 without AVX-512 (e.g. Zen 2/3): pmaddubsw/pmaddwd on ymm.
    "x86-avx2": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
    # Raspberry Pi 4: Cortex-A72, ARMv8.0-A + NEON, no dot-product instructions (sdot raises SIGILL).
    "pi4": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]},
    # Snapdragon 870: Cortex-A77, ARMv8.2-A + NEON + dotprod + fp16.
    "sd870": {
        "kind": "llvm",
        "mtriple": "aarch64-linux-gnu",
        "mcpu": "cortex-a77",
        "mattr": ["+neon", "+dotprod", "+fullfp16"],
    },
}

#: Targets that need a cross compiler to be linked into a shared library.
CROSS_COMPILERS: dict[str, str] = {"pi4": "aarch64-linux-gnu-g++", "sd870": "aarch64-linux-gnu-g++"}


@functools.lru_cache(maxsize=1)
def host_target_dict() -> dict:
    """The running CPU as a target dict (LLVM's own CPU detection; no extra attributes guessed)."""
    from tvm.target import codegen

    return {
        "kind": "llvm",
        "mtriple": str(codegen.llvm_get_system_triple()),
        "mcpu": str(codegen.llvm_get_system_cpu()),
    }


def target_names() -> list[str]:
    return [*TARGETS, "host"]


def get_target(name):
    """Return a ``tvm.target.Target`` for a name in :data:`TARGETS`, ``"host"``, a target dict or a Target."""
    import tvm

    from agile_tvm.errors import UserError

    if isinstance(name, tvm.target.Target):
        return name
    if isinstance(name, dict):
        return tvm.target.Target(name)
    if name == "host":
        return tvm.target.Target(host_target_dict())
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}: choose one of {', '.join(target_names())}")
    return tvm.target.Target(TARGETS[name])


def _features(target) -> set[str]:
    import tvm

    attrs = target.attrs
    feats = set()
    mattr = attrs.get("mattr", None)
    if mattr is not None:
        feats |= {str(m) for m in mattr}
    mcpu = str(attrs.get("mcpu", ""))
    try:
        from tvm.target import codegen

        for f in ("avx512bw", "avx2", "avx512vnni", "dotprod", "neon"):
            if codegen.target_has_features(f, target):
                feats.add("+" + f)
    except Exception:  # pragma: no cover - feature query not available
        pass
    if mcpu:
        feats.add("mcpu=" + mcpu)
    _ = tvm
    return feats


def isa_of(target) -> str:
    """The integer-dot ISA family of a target: ``avx512``, ``avx2``, ``sdot``, ``neon`` or ``generic``.

    ``avx512`` = AVX-512BW pmaddubsw on zmm (VNNI is not used: same intrinsic family, the machines we
    target lack it); ``sdot`` = AArch64 with +dotprod; ``neon`` = AArch64 without it (Cortex-A72).
    """
    target = get_target(target)
    triple = str(target.attrs.get("mtriple", ""))
    feats = _features(target)
    if triple.startswith("aarch64") or "+neon" in feats:
        return "sdot" if "+dotprod" in feats else "neon"
    if "+avx512bw" in feats:
        return "avx512"
    if "+avx2" in feats:
        return "avx2"
    return "generic"
