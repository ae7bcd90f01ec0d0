"""`agile-tvm tune`: MetaSchedule with the XGBoost cost model, candidates built on the host and measured on RPC
boards, every finished trial appended to `tune_logs/<target>/` so an interrupted run resumes where it stopped.

Order of checks before any tuning starts (each a one-line UserError): tracker reachable, a board under the key,
the board's ISA can run the target's code, the database files parse.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from agile_tvm.errors import UserError


@dataclass
class TuneOptions:
    target: str
    tracker: str
    key: str
    trials: int                      # per kernel (a resumed run only adds what is missing)
    kernels: list[str] = field(default_factory=list)
    kernel_specs: dict = field(default_factory=dict)  # frontend kernels by name (workloads.frontend_kernels)
    work_dir: Path | None = None     # default tune_logs/<target>
    trials_per_iter: int = 16
    population: int = 128
    board_wait: float = 120.0        # how long a run waits for a board to (re)appear under the key
    session_timeout: float | None = None
    num_cores: int | None = None
    builders: int = 2
    seed: int = 0
    space: str = "hand"              # `space.SPACES`: the kernels' hand space, or MetaSchedule's generic rules
    quiet: bool = False


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def preflight(opts: TuneOptions, target):
    """Tracker reachable, boards under the key, ISA match. Returns (host, port, boards, board_info)."""
    from agile_tvm.rpc import tracker as trk
    from agile_tvm.rpc.netutil import parse_hostport
    from agile_tvm.rpc.profiles import TARGET_NEEDS, missing_features

    host, port = parse_hostport(opts.tracker)
    boards = trk.wait_for_boards(host, port, opts.key, timeout=min(opts.board_wait, 15.0))
    info = trk.board_info(host, port, opts.key)
    missing = missing_features(opts.target, info.get("machine", "?"), info.get("features", []))
    if missing:
        need = ", ".join(TARGET_NEEDS[opts.target][1])
        raise UserError(
            f"ISA mismatch: target {opts.target} needs {need}, but the board under key {opts.key!r} "
            f"(profile {info.get('profile')}, {info.get('machine')}) lacks {', '.join(missing)}; its code would "
            f"crash there (SIGILL): tune for a target this board supports or use --key of a matching board")
    return host, port, boards, info


def tune(opts: TuneOptions) -> dict:
    """Run (or resume) tuning; returns {"work_dir", "tasks": {name: {"trials", "best_gflops"}}, "minutes"}."""
    if opts.trials <= 0:
        raise UserError(f"--trials must be positive (got {opts.trials})")
    from agile_tvm.tune.intrinsics import import_cpu_intrinsics

    import_cpu_intrinsics()
    from tqdm import tqdm
    from tvm.s_tir import meta_schedule as ms

    from agile_tvm.tune import progress, records
    from agile_tvm.tune.builder import is_aarch64, make_builder
    from agile_tvm.tune.runner import make_runner, measure_cold
    from agile_tvm.tune.space import space_for
    from agile_tvm.tune.targets import tuning_target
    from agile_tvm.tune.workloads import read_kernel_specs, workload, write_kernel_specs

    target = tuning_target(opts.target, opts.num_cores)
    work_dir = Path(opts.work_dir or records.tune_logs_root() / opts.target)
    if not opts.kernels:
        raise UserError("nothing to tune: pass --kernels NAME... or --model DIR")
    records.check_database_files(work_dir)  # a corrupt file is named and kept, before anything else
    host, port, boards, info = preflight(opts, target)
    db = records.open_database(work_dir, create=True)
    specs = {**read_kernel_specs(work_dir), **opts.kernel_specs}
    workloads = [workload(name, opts.target, specs) for name in opts.kernels]
    if opts.kernel_specs:  # export and the benchmark rebuild these kernels by name
        write_kernel_specs(work_dir, {n: opts.kernel_specs[n] for n in opts.kernels if n in opts.kernel_specs})
    done = progress.trials_done(work_dir)
    todo = [(w, opts.trials - done.get(w.name, 0)) for w in workloads]
    todo = [(w, n) for w, n in todo if n > 0]
    emulated = info.get("profile") in ("pi4", "sd870")
    if not opts.quiet:
        _say(f"tune {opts.target}: {len(workloads)} kernel(s), {opts.trials} trials each, {len(boards)} board(s) "
             f"under key {opts.key!r} ({info.get('profile')}, {info.get('machine')}); database {work_dir}")
        resumed = {w.name: done[w.name] for w in workloads if done.get(w.name)}
        if resumed:
            _say(f"resuming: trials already in the database: {resumed}")
    started = time.time()
    if todo:
        builder = make_builder(target, max_workers=opts.builders)
        timeout = opts.session_timeout or (180.0 if emulated else 30.0)
        runners = {cold: make_runner(host, port, opts.key, len(boards), session_timeout=timeout,
                                     number=1 if emulated else 3, repeat=1 if emulated else 3,
                                     min_repeat_ms=0 if emulated else 40, board_wait=opts.board_wait, cold=cold)
                   for cold in {measure_cold(w, target) for w, _ in todo}}
        cost_model = ms.cost_model.XGBModel(extractor=ms.feature_extractor.PerStoreFeature(),
                                            adaptive_training=True, num_tuning_cores=target.attrs["num-cores"])
        flops = {w.name: w.flops for w in workloads}
        lost = {"fatal": None, "last": 0.0}

        def board_status(kind: str, msg: str) -> None:
            from agile_tvm.rpc.tracker import boards_under_key

            try:
                n = len(boards_under_key(host, port, opts.key))
            except UserError:
                n = 0
            if kind == "no-board":
                lost["fatal"] = (f"board died mid-run: no board under key {opts.key!r} on {host}:{port} for "
                                 f"{opts.board_wait:.0f} s; every finished trial is in {work_dir}: start a board "
                                 f"and rerun the same command to resume")
                raise RuntimeError(lost["fatal"])
            if time.time() - lost["last"] > 5:
                lost["last"] = time.time()
                where = (f"continuing on the {n} board(s) still under key {opts.key!r}" if n else
                         f"no board under key {opts.key!r} now: waiting up to {opts.board_wait:.0f} s for one to "
                         f"(re)register (agile-tvm board restarts crashed workers)")
                bar.write(f"warning: a board was lost mid-measurement ({msg.splitlines()[-1][:120]}); {where}")

        total = sum(n for _, n in todo)
        bar = tqdm(total=total, desc=f"tune {opts.target}", unit="trial", disable=opts.quiet, file=sys.stderr,
                   dynamic_ncols=True)
        # the hand space has a few dozen points: asking the initial population for 50 unmeasured ones would spin
        init_unmeasured = 8 if opts.space == "hand" else 50
        try:
            for i, (w, n) in enumerate(todo):
                ctx = ms.TuneContext(
                    mod=w.func, target=target,
                    space_generator=space_for(w, target, specs.get(w.name), opts.space),
                    search_strategy=ms.search_strategy.EvolutionarySearch(
                        population_size=opts.population, init_min_unmeasured=min(init_unmeasured, opts.population)),
                    task_name=w.name, rand_state=opts.seed + i, num_threads=target.attrs["num-cores"],
                ).clone()
                callbacks = [ms.measure_callback.AddToDatabase(), ms.measure_callback.RemoveBuildArtifact(),
                             ms.measure_callback.UpdateCostModel(),
                             progress.make_callback(work_dir, [w.name], flops, bar, board_status)]
                try:
                    ms.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=str(work_dir), max_trials_global=n,
                                  max_trials_per_task=n, num_trials_per_iter=min(opts.trials_per_iter, n),
                                  builder=builder, runner=runners[measure_cold(w, target)], database=db,
                                  cost_model=cost_model,
                                  measure_callbacks=callbacks, task_scheduler="round-robin")
                except Exception as exc:  # noqa: BLE001 - translate our own abort, re-raise the rest
                    if lost["fatal"]:
                        raise UserError(lost["fatal"]) from None
                    raise
        finally:
            bar.close()
            progress.plot_curve(work_dir, f"MetaSchedule on {opts.target} (key {opts.key})")
    minutes = (time.time() - started) / 60
    done = progress.trials_done(work_dir)
    best = progress.best_gflops(work_dir)
    # a run that ends normally short of its trials ran out of new candidates (the hand space is small)
    result = {"work_dir": str(work_dir), "minutes": round(minutes, 2),
              "tasks": {w.name: {"trials": done.get(w.name, 0), "best_gflops": best.get(w.name),
                                 "exhausted": done.get(w.name, 0) < opts.trials} for w in workloads}}
    if not opts.quiet:
        for name, r in result["tasks"].items():
            g = f"{r['best_gflops']:.1f} GFLOP/s" if r["best_gflops"] else "no valid candidate yet"
            note = " (every distinct schedule of its search space measured)" if r["exhausted"] else ""
            _say(f"  {name}: {r['trials']} trials{note}, best {g}")
        _say(f"tuning curve: {work_dir / 'tuning_curve.png'}; refresh schedules/ with "
             f"`agile-tvm schedules export --target {opts.target}`")
    return result
