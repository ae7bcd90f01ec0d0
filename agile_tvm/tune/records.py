"""Tuned schedule records: `schedules/<target>/` (curated, committed) and `tune_logs/<target>/` (raw).

Both folders hold a MetaSchedule JSON database (`database_workload.json` + `database_tuning_record.json`,
JSON lines). MetaSchedule does not check the target on lookup, so there is one folder per target name.
A record applies to a PrimFunc that is structurally equal to the *unscheduled* function it was tuned from.

Two ways the compiler applies them, both falling back to what it had when there is no record:

1. Our kernels (what `agile-tvm tune` tunes): build the unscheduled kernel and ask for its tuned schedule::

       from agile_tvm.tune.records import tuned_func
       f = tuned_func(unscheduled, "x86-avx2")                # None -> use agile_tvm.kernels' hand schedule

   The frontend does this for every static-shape linear kernel it emits (decode, m=1, incl. the LM head:
   `frontend.linears.LinearEmitter._linear_kernel`, database opened once per build: `ScheduleRecords`).
   Symbolic-M (prefill) kernels: MetaSchedule tunes and matches static shapes only, so `agile-tvm tune --model`
   tunes each one's static proxy (M = `workloads.PREFILL_PROXY_M`) in the hand space (`space.hand_space`), and
   the proxy's best trace is replayed on the symbolic-M kernel (`replayed_func`): the trace holds only the hand
   schedule's instructions with concrete parameters, none of which depends on M.

2. A Relax module of ordinary ops (records tuned with `ms.relax_integration.tune_relax`): legalize + fuse
   first, since records are keyed by the *fused* TIR functions, then apply the database::

       mod = apply_schedules(mod, target, "x86-avx2")         # = zero_pipeline() under `with target, db`
       ex = tvm.compile(mod, target)

"""

from __future__ import annotations

import json
import os
from pathlib import Path

from agile_tvm.errors import UserError

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"

REPO_ROOT = Path(__file__).resolve().parents[2]


def schedules_root() -> Path:
    """Where curated records live; `AGILE_TVM_SCHEDULES` overrides (tests, installed packages)."""
    return Path(os.environ.get("AGILE_TVM_SCHEDULES", REPO_ROOT / "schedules"))


def tune_logs_root() -> Path:
    """Where raw tuning databases live; `AGILE_TVM_TUNE_LOGS` overrides."""
    return Path(os.environ.get("AGILE_TVM_TUNE_LOGS", REPO_ROOT / "tune_logs"))


def check_database_files(work_dir: Path) -> tuple[int, int]:
    """Validate both JSON-lines files of a database folder; return (workloads, records).

    MetaSchedule aborts deep in C++ on a malformed line, so we parse first and raise a UserError that names
    the file and line. The file is never modified here: the user keeps the evidence.
    """
    counts = []
    for name in (WORKLOAD_FILE, RECORD_FILE):
        path = Path(work_dir) / name
        n = 0
        if path.exists():
            with open(path, encoding="utf-8", errors="strict") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise UserError(
                            f"corrupt tuning database {path} (line {lineno}: {exc.msg}); it was left untouched: "
                            f"move it aside or delete it, then rerun"
                        ) from None
                    if not isinstance(row, list) or len(row) < 2:
                        raise UserError(
                            f"corrupt tuning database {path} (line {lineno}: not a MetaSchedule row); it was left "
                            f"untouched: move it aside or delete it, then rerun"
                        )
                    n += 1
        counts.append(n)
    return counts[0], counts[1]


def open_database(work_dir: Path, create: bool):
    """A JSONDatabase on `work_dir` after validating it; `create` makes the folder (tuning appends there)."""
    from tvm.s_tir import meta_schedule as ms

    from agile_tvm.tune.intrinsics import import_cpu_intrinsics

    import_cpu_intrinsics()  # the loader parses traces that tensorize with the agile_* intrinsics: register them first
    work_dir = Path(work_dir)
    if create:
        work_dir.mkdir(parents=True, exist_ok=True)
    check_database_files(work_dir)
    try:
        return ms.database.JSONDatabase(work_dir=str(work_dir), allow_missing=create)
    except Exception as exc:  # the C++ loader also rejects rows that parse as JSON but not as records
        raise UserError(
            f"corrupt tuning database in {work_dir} ({str(exc).splitlines()[-1][:200]}); it was left "
            f"untouched: move it aside or delete it, then rerun"
        ) from None


def schedule_database(target_name: str):
    """The curated records for `target_name` from `schedules/<target>/` as a Database, or None if there are none.

    Read only: nothing is written to `schedules/` when compiling.
    """
    folder = schedules_root() / target_name
    if not (folder / WORKLOAD_FILE).exists() or not (folder / RECORD_FILE).exists():
        return None
    _, n_records = check_database_files(folder)
    if n_records == 0:
        return None
    return open_database(folder, create=False)


def apply_schedules(mod, target, target_name: str, enable_warning: bool = False):
    """Legalize + fuse a Relax module and apply `schedules/<target_name>/` to its TIR functions.

    Returns the module unchanged when there are no records, so callers fall back to their hand schedules.
    """
    import tvm
    from tvm import relax

    db = schedule_database(target_name)
    if db is None:
        return mod
    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)
    with target, db, tvm.transform.PassContext(opt_level=3):
        return relax.pipeline.zero_pipeline(enable_warning=enable_warning)(mod)


def tuned_func(func, target_name: str, db=None):
    """The tuned schedule of an *unscheduled* PrimFunc from `schedules/<target>/`, or None (use the hand one).

    This is how a kernel gets its tuned schedule at compile time: build the unscheduled TE of the kernel
    (`agile_tvm.kernels.linear._linear_func(..., schedule=False)`), ask here, fall back to the kernels' hand
    schedule on None. `db`: an already opened `schedule_database` (opening it per kernel is slow).
    The returned PrimFunc is marked `tir.is_scheduled` so Relax leaves it alone.
    """
    db = db if db is not None else schedule_database(target_name)
    record = None if db is None else _best_record(db, func, target_name)
    return None if record is None else _scheduled(func, record.trace, remove_postproc=False)


def replayed_func(func, proxy, target_name: str, db=None):
    """`func` (an unscheduled symbolic-M kernel) scheduled by the trace of the best record of `proxy` (its
    unscheduled static-M twin), or None: no record, or a record whose trace does not replay on `func` (one from
    the "generic" space; a warning says so and the hand schedule stays)."""
    import tvm

    db = db if db is not None else schedule_database(target_name)
    record = None if db is None else _best_record(db, proxy, target_name)
    if record is None:
        return None
    try:
        return _scheduled(func, record.trace, remove_postproc=True)
    except tvm.TVMError as exc:
        import sys

        print(f"warning: the record of {_symbol(func) or 'a kernel'}'s static proxy does not replay on its "
              f"symbolic-M kernel ({str(exc).strip().splitlines()[-1][:120]}): keeping the hand schedule; re-tune "
              f"with the default hand space", file=sys.stderr)
        return None


def _symbol(func) -> str | None:
    return str(func.attrs["global_symbol"]) if func.attrs and "global_symbol" in func.attrs else None


def _main_mod(func):
    """`func` as the IRModule records are keyed by (its name "main"), on a copy: a Schedule of
    `_normalize_mod(f)` edits f's body in place (found in TVM 0.27)."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func.with_attr("global_symbol", "main"))


def _best_record(db, func, target_name: str):
    from agile_tvm.tune.intrinsics import import_cpu_intrinsics

    import_cpu_intrinsics()  # traces that tensorize name the agile_* intrinsics
    from agile_tvm.tune.targets import tuning_target

    return db.query_tuning_record(_main_mod(func), tuning_target(target_name), "main")


def _scheduled(func, trace, remove_postproc: bool):
    """`func` scheduled by `trace`, marked `tir.is_scheduled` (Relax leaves it alone), under its own name."""
    import tvm

    sch = tvm.s_tir.Schedule(_main_mod(func))
    trace.apply_to_schedule(sch, remove_postproc=remove_postproc)
    tuned = sch.mod["main"].with_attr("tir.is_scheduled", True)
    name = _symbol(func)
    return tuned.with_attr("global_symbol", name) if name else tuned


class ScheduleRecords:
    """`schedules/<target>/` opened once for one model build: `tuned(func)` per kernel, counting what it found.

    `for_target(target)` gives None when there are no records, so the caller keeps its hand schedules. Records
    are kept per named target; any other target (e.g. "host") uses the records of the named target with its
    ISA family (`records_target_name`): the kernels' unscheduled TE, and so the records, depend only on that."""

    def __init__(self, target_name: str, db):
        self.target_name, self.db = target_name, db
        self.asked = 0
        self.found = 0

    @classmethod
    def for_target(cls, target):
        name = records_target_name(target)
        if name is None:
            return None
        db = schedule_database(name)  # a corrupt database is a UserError naming the file
        return None if db is None else cls(name, db)

    def tuned(self, func):
        self.asked += 1
        got = tuned_func(func, self.target_name, self.db)
        self.found += got is not None
        return got

    def replayed(self, func, proxy):
        self.asked += 1
        got = replayed_func(func, proxy, self.target_name, self.db)
        self.found += got is not None
        return got


def records_target_name(target) -> str | None:
    """The named target whose `schedules/` records apply to `target`: itself when named, else the named target of
    the same ISA family and architecture (e.g. host on an AVX2 machine -> x86-avx2), None when there is none."""
    from agile_tvm.targets import TARGETS, get_target, isa_of
    from agile_tvm.tune.targets import target_name_of

    if isinstance(target, str) and target in TARGETS:
        return target
    target = get_target(target)
    name = target_name_of(target)
    if name is not None:
        return name
    arch = str(target.attrs.get("mtriple", "")).split("-")[0]
    isa = isa_of(target)
    return next((n for n, d in TARGETS.items() if d.get("mtriple", "").split("-")[0] == arch
                 and isa_of(get_target(n)) == isa), None)


def tuned_linear_func(wbits: int, N: int, K: int, M: int, target_name: str):
    """Tuned W4A8/W8A8 linear with static M (the shapes `agile-tvm tune --model` tunes), or None."""
    if schedule_database(target_name) is None:
        return None
    from agile_tvm.tune.workloads import linear_func

    return tuned_func(linear_func(wbits, N, K, M, target_name), target_name)
