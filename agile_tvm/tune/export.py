"""`agile-tvm schedules export`: curate `tune_logs/<target>/` into the committed `schedules/<target>/`.

For every kernel tuned there, take the fastest records and keep the first one that computes the same result as
the untuned kernel (tuned schedules can silently miscompile with tensor intrinsics: notes, tvm-0.27-findings).
x86 targets are checked on this machine when its CPU has the ISA; other targets are exported unverified unless a
board is given. The output folder is replaced atomically, with a `manifest.json` saying what each record is.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from agile_tvm.errors import UserError

TOP_K = 5


def random_args(func, seed: int = 0) -> list[np.ndarray]:
    """Random inputs for every parameter of a PrimFunc (outputs too: they are overwritten).

    Power-of-two shifts (`act_shift`, `out_shift`) get small values as in a checkpoint: 2^-shift of a random byte
    overflows the kernel's int32 shift, and such inputs would test nothing a model computes."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    rng = np.random.default_rng(seed)
    names = [str(p.name) for p in func.params]  # the TE placeholders' names (act_shift, wpack, ...)
    arrays = []
    for name, info in zip(names, ArgInfo.from_prim_func(func)):
        shape = [int(s) for s in info.shape]
        dtype = str(info.dtype)
        if name.endswith("_shift"):
            a = rng.integers(0, 3, shape)
        elif dtype == "uint8":
            a = rng.integers(0, 256, shape)
        elif dtype in ("int8", "int16"):
            a = rng.integers(-15, 16, shape)
        elif dtype.startswith("int"):
            a = rng.integers(-1000, 1000, shape)
        else:
            a = rng.uniform(0.5, 1.5, shape)
        arrays.append(np.asarray(a, dtype=dtype))
    return arrays


def run_local(rt_mod, arrays) -> list[np.ndarray]:
    import tvm

    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
    rt_mod["main"](*tensors)
    return [t.numpy() for t in tensors]


def host_can_run(target) -> bool:
    """Can this machine execute code for `target` (x86 ISA features present)?"""
    from agile_tvm.rpc.board_worker import cpu_features
    from agile_tvm.rpc.profiles import missing_features

    name = _target_name_of(target)
    import platform

    return name is not None and not missing_features(name, platform.machine(), cpu_features())


def _target_name_of(target) -> str | None:
    from agile_tvm.tune.targets import target_name_of

    return target_name_of(target)


#: A record is exported only when it beats the hand schedule here by this factor: below it, the back-to-back
#: re-measure cannot tell them apart on this machine (ties measured 0.99-1.01x).
MIN_GAIN = 1.02


def measure_on_all_cores() -> None:
    """Time kernels here on every core, as the model and the boards (`rpc.supervisor`) run them: TVM's default
    here is 1 thread. Call before the first TVM kernel runs (the thread pool reads it once); TVM_NUM_THREADS set by
    the user wins."""
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))


def time_gflops(rt_mod, arrays, flops: float, repeat: int = 5, cold: bool = False) -> float:
    """Median GFLOP/s of `main` over `repeat` runs of at least 50 ms each, on this machine; `cold`: each run one
    call after flushing every argument but the first from the caches (decode GEMVs: `runner.measure_cold`)."""
    import tvm

    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
    if cold:
        timer = rt_mod.time_evaluator("main", dev, number=1, repeat=5 * repeat,
                                      f_preproc="cache_flush_cpu_non_first_arg")
    else:
        timer = rt_mod.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=50)
    return flops / float(np.median(timer(*tensors).results)) / 1e9


def hand_module(name, target_name, target, specs=None):
    """The compiled hand schedule of the same workload (None if it is not a kernel workload)."""
    import tvm

    from agile_tvm.tune.workloads import hand_func

    func = hand_func(name, target_name, specs)
    return None if func is None else tvm.compile(func, target=target).mod


def interleaved_gflops(modules: list, arrays, flops: float, cold: bool, rounds: int = 3) -> list[float]:
    """GFLOP/s of each module, measured round by round in turn (this machine's speed drifts by 20-30% within
    minutes: back-to-back blocks would compare different machines); the median of the rounds."""
    runs = [[] for _ in modules]
    for _ in range(rounds):
        for i, mod in enumerate(modules):
            runs[i].append(time_gflops(mod, arrays, flops, cold=cold))
    return [float(np.median(r)) for r in runs]


def outputs_match(got: list[np.ndarray], want: list[np.ndarray]) -> tuple[bool, str]:
    """Compare every parameter after two runs on copies of the same inputs: inputs are equal in both, so this
    compares every output, however many a kernel writes (fused GEMVs write one per linear)."""
    bad = []
    for i, (g, w) in enumerate(zip(got, want)):
        if np.issubdtype(w.dtype, np.integer):
            ok = np.array_equal(g, w)
        else:
            ok = np.allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max() or 1))
        if not ok:
            frac = float(np.mean(~np.isclose(g, w, rtol=1e-5)))
            bad.append(f"parameter {i}: {frac:.0%} differ")
    if not bad:
        return True, "matches the untuned kernel"
    return False, f"WRONG RESULTS vs the untuned kernel: {'; '.join(bad)}"


def verify_schedule(sch, workload_mod, target) -> tuple[bool, str]:
    """Build the tuned and the untuned kernel, run both on the same random inputs, compare every output."""
    import tvm

    func = workload_mod["main"]
    arrays = random_args(func)
    try:
        tuned = tvm.compile(sch.mod, target=target)
    except Exception as exc:  # noqa: BLE001
        return False, f"does not build: {str(exc).splitlines()[-1][:160]}"
    ref = tvm.compile(workload_mod, target=target)
    got = run_local(tuned.mod, [a.copy() for a in arrays])
    want = run_local(ref.mod, [a.copy() for a in arrays])
    return outputs_match(got, want)


def export_schedules(target_name: str, work_dir: Path | None = None, out_dir: Path | None = None,
                     verify: bool = True, log=None, beat_hand: bool = True, model: Path | None = None,
                     model_rounds: int = 11) -> dict:
    """Write the curated records; with `beat_hand`, a record slower here than the hand schedule is left out; with
    `model` (a quantized checkpoint), a phase's records are left out unless that phase of the model runs faster
    with them (`model_check`)."""
    measure_on_all_cores()
    from agile_tvm.tune.intrinsics import import_cpu_intrinsics

    import_cpu_intrinsics()
    from agile_tvm.tune import progress, records
    from agile_tvm.tune.targets import tuning_target

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    work_dir = Path(work_dir or records.tune_logs_root() / target_name)
    out_dir = Path(out_dir or records.schedules_root() / target_name)
    if not (work_dir / records.RECORD_FILE).exists():
        raise UserError(f"no tuning database in {work_dir}: run `agile-tvm tune --target {target_name} ...` first")
    db = records.open_database(work_dir, create=False)
    target = tuning_target(target_name)
    can_verify = verify and host_can_run(target)
    if verify and not can_verify:
        log(f"warning: this machine cannot run {target_name} code: records are exported unverified")
    if model is not None and not host_can_run(target):
        log(f"warning: this machine cannot run {target_name} code: the records are not checked in the model")
        model = None
    names = sorted(progress.trials_done(work_dir))
    trials = progress.trials_done(work_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        manifest = _export_into(tmp, names, trials, db, target, target_name, work_dir, can_verify, log, beat_hand,
                                model, model_rounds)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; schedules/ is committed and read by everyone
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    log(f"wrote {len(manifest['kernels'])} record(s) to {out_dir}")
    return manifest


def _export_into(tmp, names, trials, db, target, target_name, work_dir, can_verify, log, beat_hand, model=None,
                 model_rounds=11) -> dict:
    import tvm
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from agile_tvm.tune.runner import measure_cold
    from agile_tvm.tune.targets import target_dict
    from agile_tvm.tune.workloads import read_kernel_specs, workload

    specs = read_kernel_specs(work_dir)
    manifest = {"target": target_name, "target_dict": target_dict(target_name),
                "kernels": {}, "skipped": {}}
    choices = {}  # name -> (workload module, record) to write
    for name in names:
        try:
            wl = workload(name, target_name, specs)
        except UserError as exc:
            log(f"skip {name}: {exc}")
            continue
        mod = _normalize_mod(wl.func)
        if not db.has_workload(mod):
            log(f"skip {name}: no workload in {work_dir} matches today's kernel (the kernel changed since tuning?)")
            continue
        top = db.get_top_k(db.commit_workload(mod), TOP_K)
        candidates = []  # (record, GFLOP/s measured on the board while tuning, check)
        for rank, rec in enumerate(top):
            secs = [float(s) for s in rec.run_secs]
            gflops = wl.flops / (sum(secs) / len(secs)) / 1e9
            sch = tvm.s_tir.Schedule(mod)
            rec.trace.apply_to_schedule(sch, remove_postproc=False)
            status = "not verified"
            if can_verify:
                ok, status = verify_schedule(sch, mod, target)
                if not ok:
                    log(f"{name}: record #{rank + 1} ({gflops:.1f} GFLOP/s) rejected: {status}")
                    continue
            candidates.append((rec, gflops, status, sch))
            if not can_verify:
                break
        if not candidates:
            log(f"{name}: no verified record among the best {len(top)}: not exported (hand schedule stays)")
            continue
        chosen = candidates[0][:3]
        hand_gflops = None
        if can_verify:
            # Re-measure the verified candidates and the hand schedule back to back here: the best time logged
            # while tuning is the luckiest of many noisy runs, and a record slower than the hand schedule
            # would make compilation worse, not better.
            arrays = random_args(mod["main"], seed=1)
            cold = measure_cold(wl, target)
            hand = hand_module(name, target_name, target, specs)
            modules = [tvm.compile(c[3].mod, target=target).mod for c in candidates] + ([hand] if hand else [])
            measured = interleaved_gflops(modules, arrays, wl.flops, cold)
            timed = list(zip(measured[:len(candidates)], candidates))
            local, best = max(timed, key=lambda t: t[0])
            chosen = (best[0], local, best[2])
            hand_gflops = measured[-1] if hand else None
            if beat_hand and hand_gflops is not None and local < MIN_GAIN * hand_gflops:
                log(f"{name}: tuned {local:.1f} GFLOP/s vs hand schedule {hand_gflops:.1f} GFLOP/s here"
                    f"{' (cold caches)' if cold else ''}: not {MIN_GAIN:.2f}x faster, not exported (the hand "
                    f"schedule stays)")
                manifest["skipped"][name] = {"tuned_gflops": round(local, 2), "hand_gflops": round(hand_gflops, 2),
                                             "trials": trials.get(name, 0)}
                continue
        rec, gflops, status = chosen
        choices[name] = (mod, rec)
        manifest["kernels"][name] = {"gflops": round(gflops, 2), "trials": trials.get(name, 0),
                                     "verified": status == "matches the untuned kernel", "check": status,
                                     "hand_gflops": None if hand_gflops is None else round(hand_gflops, 2),
                                     "measured": ("here, round by round with the hand schedule"
                                                  + (", cold caches" if cold else "")) if hand_gflops
                                     else "on the board while tuning"}
        log(f"{name}: {gflops:.1f} GFLOP/s after {trials.get(name, 0)} trials ({status})")
    if model is not None and choices:
        _check_in_model(choices, manifest, specs, model, model_rounds, target, target_name, log)
    _write_records(tmp, choices, target)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _write_records(folder: Path, choices: dict, target) -> None:
    """A schedules/ database in `folder` holding each chosen (workload module, record)."""
    from tvm.s_tir import meta_schedule as ms

    out_db = ms.database.JSONDatabase(work_dir=str(folder), allow_missing=True)
    for mod, rec in choices.values():
        out_db.commit_tuning_record(ms.database.TuningRecord(rec.trace, out_db.commit_workload(mod), rec.run_secs,
                                                             target, rec.args_info))


def _check_in_model(choices: dict, manifest: dict, specs: dict, model, rounds: int, target, target_name, log) -> None:
    """Drop from `choices` (and move to the manifest's "skipped") each record whose phase of the model does not
    run MIN_GAIN faster with all the candidates than with the hand schedules (`model_check`)."""
    from agile_tvm.tune.model_check import gate, measure_in_model

    with tempfile.TemporaryDirectory(prefix="agile-tvm-candidates-") as scratch:
        _write_records(Path(scratch), choices, target)
        check = measure_in_model(model, target_name, Path(scratch), rounds=rounds, log=log)
    _, dropped = gate(list(choices), specs, check, MIN_GAIN)
    for name, why in dropped.items():
        log(f"{name}: not exported: {why}")
        manifest["skipped"][name] = {**manifest["kernels"].pop(name), "model": why}
        del choices[name]
    manifest["model_check"] = {"checkpoint": str(model), "min_gain": MIN_GAIN, **check.as_dict()}
