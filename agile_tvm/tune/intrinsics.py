"""Register the tensor intrinsics MetaSchedule needs, without the 75-100 s import of all of TVM's.

`import tvm.s_tir.tensor_intrin` imports every stock intrinsic, CUDA's included (most of that time); MetaSchedule's
TuneContext and default builder import that package. We pre-register an empty package object so that import
becomes free. Our search spaces only tensorize with the kernels' own `agile_*` intrinsics, so those are all we
register (parsing TVMScript is not free either); `stock=True` adds TVM's x86 or ARM ones.
"""

from __future__ import annotations

import importlib
import os
import sys
import types


def stub_stock_intrinsics() -> None:
    """Make `import tvm.s_tir.tensor_intrin` a no-op (its submodules stay importable one by one)."""
    import tvm.s_tir

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        pkg = types.ModuleType(name, "stand-in installed by agile_tvm.tune.intrinsics")
        pkg.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
        pkg.__package__ = name
        sys.modules[name] = pkg
        tvm.s_tir.tensor_intrin = pkg


def import_cpu_intrinsics(stock: tuple[str, ...] = ()) -> None:
    """Stub the stock package, register the kernels' intrinsics, and the stock `stock` families ("x86", "arm_cpu")."""
    stub_stock_intrinsics()
    for sub in stock:
        importlib.import_module(f"tvm.s_tir.tensor_intrin.{sub}")
    try:
        from agile_tvm.kernels import intrin
    except ImportError:  # kernels not present: plain workloads need no intrinsic
        return
    intrin.register_all()
