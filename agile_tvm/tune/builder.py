"""The MetaSchedule builder: compile candidates on the host and link a `.so` for the board.

Boards have no compiler, and MetaSchedule's default export writes a `.tar` of object files that the board must link
itself; so aarch64 candidates are cross-linked here with `aarch64-linux-gnu-g++`. Build workers also skip the
default builder's `import tvm.s_tir.tensor_intrin` (75-100 s, longer than the default 30 s build timeout).
The functions are module-level so the Popen build workers can import them by reference.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from agile_tvm.errors import UserError

AARCH64_CXX = "aarch64-linux-gnu-g++"


def worker_init() -> None:
    """Runs once in each build worker. Candidates arrive already tensorized, so no intrinsic is needed; just make
    sure nothing triggers the slow stock-intrinsics import."""
    from agile_tvm.tune.intrinsics import stub_stock_intrinsics

    stub_stock_intrinsics()


def _warm_up() -> None:
    import tvm.driver  # noqa: F401 - the import is the point: pay it before the first batch


def build_candidate(mod, target, _params):
    """Compile one scheduled candidate (what MetaSchedule's default_build does, minus the slow import)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _export(rt_mod, fcompile) -> str:
    path = os.path.join(tempfile.mkdtemp(prefix="agile-tvm-build-"), "candidate.so")
    rt_mod.export_library(path, fcompile=fcompile)
    return path


def export_host_so(rt_mod) -> str:
    """Link a native `.so` (x86 boards)."""
    return _export(rt_mod, None)


def export_aarch64_so(rt_mod) -> str:
    """Cross-link an aarch64 `.so` on the host (emulated and real ARM boards)."""
    from tvm.support import cc

    return _export(rt_mod, cc.cross_compiler(AARCH64_CXX))


def is_aarch64(target) -> bool:
    return "aarch64" in str(target.attrs.get("mtriple", ""))


def make_builder(target, max_workers: int, timeout_sec: float = 120.0, recycle_after: int = 128):
    """A builder that exports `.so` files the board can load directly.

    Unlike MetaSchedule's LocalBuilder, the worker pool is kept across batches (LocalBuilder starts fresh workers,
    each importing TVM, for every batch: 10-15 s per batch on this 2-core machine) and recycled every
    `recycle_after` builds to bound the workers' memory growth.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    if is_aarch64(target) and shutil.which(AARCH64_CXX) is None:
        raise UserError(f"{AARCH64_CXX} not found: aarch64 candidates are linked on the host; run scripts/setup-boards "
                        f"(installs g++-aarch64-linux-gnu)")
    f_export = export_aarch64_so if is_aarch64(target) else export_host_so

    @derived_object
    class HostBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool = None
            self.built = 0
            pool = self._pool()
            for _ in range(max_workers):  # start the workers now, while the search space is generated
                pool.submit(_warm_up)

        def _pool(self):
            if self.pool is None or self.built >= recycle_after:
                if self.pool is not None:
                    self.pool.shutdown()
                self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec, initializer=worker_init)
                self.built = 0
            return self.pool

        def build(self, build_inputs):
            jobs = [(build_candidate, f_export, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
            results = []
            for res in self._pool().map_with_error_catching(lambda job: _worker_func(*job), jobs):
                if res.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(res.value, None))
                elif res.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {timeout_sec:.0f} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {res.value}"))
            self.built += len(jobs)
            return results

    return HostBuilder()
