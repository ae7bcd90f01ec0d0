"""Tuned records reach the compiled model: the frontend looks up `schedules/<target>/` for every static-shape
(decode) linear kernel it emits and falls back to the hand schedule without a record; a corrupt database is a
UserError. The record here is one we write (parallelize the float tile's n loop), so the decode logits must be
exactly those of the hand-scheduled build: same arithmetic per output, only the loop order around it changes."""

from __future__ import annotations

import numpy as np
import pytest

from agile_tvm.errors import UserError
from agile_tvm.rpc.profiles import host_x86_target

X86 = "x86-avx2"
pytestmark = pytest.mark.skipif(host_x86_target() is None, reason="needs an x86 host with AVX2 (runs x86-avx2 code)")
MAX_LEN = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny LLaMA agileq8 checkpoint (v2: per-token activations, float weight offsets, INT8 LM head), with free
    float scales: on the pow2 grid (agileq8's default) prefill runs the integer-scale GEMM, which has no tuning
    space, and these tests are about the tuned float-epilogue prefill kernels."""
    import torch

    from agile_tvm.models import tiny_model
    from agile_tvm.quant.apply import quantize_model
    from agile_tvm.quant.checkpoint import save_quantized
    from agile_tvm.quant.configs import get_config

    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    cfg = get_config("agileq8")
    cfg.weight.scale_grid = "float"
    save_quantized(quantize_model(tiny_model("llama"), cfg, calib), out)
    return out


@pytest.fixture(scope="module")
def specs(ckpt):
    from agile_tvm.tune.workloads import frontend_kernels

    return frontend_kernels(ckpt, X86)


def _write_record(folder, spec):
    """A schedules/ database holding one record for `spec`'s kernel: its float tile's n loop made parallel."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from agile_tvm.tune.targets import tuning_target
    from agile_tvm.tune.workloads import kernel_func

    func = kernel_func(spec, X86)
    mod = _normalize_mod(func)
    sch = tvm.s_tir.Schedule(mod)
    sch.parallel(sch.get_loops(sch.get_sblock("facc"))[1])
    folder.mkdir(parents=True)
    db = ms.database.JSONDatabase(work_dir=str(folder), allow_missing=True)
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(mod), [1e-6],
                                                     tuning_target(X86), ArgInfo.from_prim_func(func)))


def _decode_logits(ckpt, out):
    """Export for x86-avx2 and run 6 decode steps (the static m=1 kernels) from an empty cache."""
    from agile_tvm.runtime import load_module
    from agile_tvm.runtime.export import export

    manifest = export(ckpt, X86, out, max_seq_len=MAX_LEN, log=lambda *a: None)
    lm = load_module(out)
    cache = lm.new_cache()
    ids = np.random.RandomState(0).randint(0, 256, (1, 6))
    steps = []
    for t in range(ids.shape[1]):
        last, cache = lm.step(ids[:, t:t + 1], t, cache)
        steps.append(np.asarray(last))
    return np.stack(steps), manifest


def _decode(specs):
    return {n: s for n, s in specs.items() if s["options"]["m"] == 1}


def test_frontend_kernels_are_the_decode_kernels_and_prefill_proxies(specs):
    """Decode: m=1 GEMVs that quantize x themselves; q/k/v and gate/up come fused; the LM head is the 8-bit
    int8-tile kernel. Prefill: a static M=512 proxy of each symbolic-M kernel (q/k/v as slices of one weight)."""
    from agile_tvm.tune.workloads import PREFILL_PROXY_M

    decode = _decode(specs)
    assert decode and all(s["options"]["x_float"] for s in decode.values())
    assert any(s["options"].get("outs") and len(s["options"]["outs"]) == 3 for s in decode.values())  # q/k/v
    assert any(s["wbits"] == 8 and s["options"]["wfmt"] == "int8" for s in decode.values())  # LM head
    prefill = {n: s for n, s in specs.items() if n not in decode}
    assert prefill and all(s["options"]["m"] == PREFILL_PROXY_M and not s["options"].get("x_float")
                           for s in prefill.values())
    assert sum(bool(s["options"].get("n_total")) for s in prefill.values()) >= 3  # q, k, v slices


def _prefill_logits(ckpt, out):
    from agile_tvm.runtime import load_module
    from agile_tvm.runtime.export import export

    export(ckpt, X86, out, max_seq_len=MAX_LEN, log=lambda *a: None)
    lm = load_module(out)
    ids = np.random.RandomState(1).randint(0, 256, (1, 20))
    last, _ = lm.step(ids, 0, lm.new_cache())
    return np.asarray(last)


def test_record_applied_when_compiling_and_logits_unchanged(ckpt, specs, tmp_path, monkeypatch):
    from agile_tvm.frontend import build_module
    from agile_tvm.tune import records

    name = next(n for n, s in _decode(specs).items() if s["wbits"] == 4 and not s["options"].get("outs"))
    monkeypatch.setenv("AGILE_TVM_SCHEDULES", str(tmp_path / "empty"))  # missing folder: hand schedules only
    hand, hand_manifest = _decode_logits(ckpt, tmp_path / "hand")
    assert "tuned records: none for this target" in hand_manifest["schedules"]

    _write_record(tmp_path / "sched" / X86, specs[name])
    monkeypatch.setenv("AGILE_TVM_SCHEDULES", str(tmp_path / "sched"))
    mod, _, _ = build_module(ckpt, max_seq_len=MAX_LEN, target=X86)
    marks = {gv.name_hint: str(f.attrs["agile_tvm.schedule"]) for gv, f in mod.functions.items()
             if f.attrs is not None and "agile_tvm.schedule" in f.attrs}
    assert sorted(marks.values()).count(f"record {X86}") == 1 and len(marks) == len(specs), marks
    tuned_func = next(f for gv, f in mod.functions.items() if marks.get(gv.name_hint) == f"record {X86}")
    assert "T.parallel" in tuned_func.script()  # the record's schedule, not the hand one or the bare TE
    assert records.records_target_name("host") == host_x86_target()  # host uses its ISA's named target's records
    if host_x86_target() == X86:
        assert records.ScheduleRecords.for_target("host").target_name == X86
    untuned, _, _ = build_module(ckpt, max_seq_len=MAX_LEN, target=X86, tuned=False)  # export --no-tuned
    assert {str(f.attrs["agile_tvm.schedule"]) for _, f in untuned.functions.items()
            if f.attrs is not None and "agile_tvm.schedule" in f.attrs} == {"hand"}

    tuned, manifest = _decode_logits(ckpt, tmp_path / "tuned")
    assert f"tuned records: 1 of {len(specs)} linear kernels (schedules/{X86})" in manifest["schedules"]
    np.testing.assert_array_equal(tuned, hand)


def test_prefill_kernel_replays_its_proxys_record_and_logits_unchanged(ckpt, specs, tmp_path, monkeypatch):
    """A record tuned on a prefill kernel's static proxy (a hand-space point other than the hand choice) is
    replayed on the symbolic-M kernel the prefill runs: the kernel is marked, its loops are the record's, and the
    prefill logits are exactly the hand build's (tiles and chunks change the loop order, not the sums)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from agile_tvm.frontend import build_module
    from agile_tvm.kernels.schedule import schedule_linear
    from agile_tvm.tune.targets import tuning_target
    from agile_tvm.tune.workloads import PREFILL_PROXY_M, kernel_func, kernel_info

    monkeypatch.setenv("AGILE_TVM_SCHEDULES", str(tmp_path / "empty"))
    hand = _prefill_logits(ckpt, tmp_path / "hand")
    name = next(n for n, s in specs.items() if s["options"]["m"] == PREFILL_PROXY_M and s["wbits"] == 4
                and not s["options"].get("n_total"))
    func = kernel_func(specs[name], X86)
    mod = _normalize_mod(func)
    sch = tvm.s_tir.Schedule(mod)
    schedule_linear(None, kernel_info(specs[name], X86), sch=sch, nt=1, chunked=True, chunks=2)
    folder = tmp_path / "sched" / X86
    folder.mkdir(parents=True)
    db = ms.database.JSONDatabase(work_dir=str(folder), allow_missing=True)
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(_normalize_mod(
        kernel_func(specs[name], X86))), [1e-6], tuning_target(X86), ArgInfo.from_prim_func(func)))
    monkeypatch.setenv("AGILE_TVM_SCHEDULES", str(tmp_path / "sched"))
    built, _, _ = build_module(ckpt, max_seq_len=MAX_LEN, target=X86)
    replayed = [f for _, f in built.functions.items() if f.attrs is not None
                and str(f.attrs.get("agile_tvm.schedule", "")) == f"record {X86} (M={PREFILL_PROXY_M} proxy)"]
    assert len(replayed) == 1
    assert f"({PREFILL_PROXY_M}," not in replayed[0].script(), "the replayed kernel keeps its symbolic M"
    assert replayed[0].script().count("T.parallel") == 1
    np.testing.assert_array_equal(_prefill_logits(ckpt, tmp_path / "tuned"), hand)


def test_empty_schedules_folder_keeps_hand_schedules(ckpt, specs, tmp_path, monkeypatch):
    from agile_tvm.frontend import build_module
    from agile_tvm.tune import records

    (tmp_path / X86).mkdir()
    (tmp_path / X86 / records.WORKLOAD_FILE).write_text("")
    (tmp_path / X86 / records.RECORD_FILE).write_text("")
    monkeypatch.setenv("AGILE_TVM_SCHEDULES", str(tmp_path))
    mod, _, _ = build_module(ckpt, max_seq_len=MAX_LEN, target=X86)
    marks = [str(f.attrs["agile_tvm.schedule"]) for _, f in mod.functions.items()
             if f.attrs is not None and "agile_tvm.schedule" in f.attrs]
    assert marks and set(marks) == {"hand"}  # no records at all: nothing to look up


def test_corrupt_schedules_database_is_a_user_error(ckpt, tmp_path, monkeypatch):
    from agile_tvm.frontend import build_module
    from agile_tvm.tune import records

    (tmp_path / X86).mkdir()
    (tmp_path / X86 / records.WORKLOAD_FILE).write_text("")
    bad = tmp_path / X86 / records.RECORD_FILE
    bad.write_text('[0, [[["GetSBlock"]]\n{not json\n')
    monkeypatch.setenv("AGILE_TVM_SCHEDULES", str(tmp_path))
    with pytest.raises(UserError, match=f"corrupt tuning database {bad}"):
        build_module(ckpt, max_seq_len=MAX_LEN, target=X86)
    assert bad.read_text().endswith("{not json\n")  # kept as it was


def test_verify_compares_every_output_of_a_fused_kernel():
    """A kernel with several outputs (fused q/k/v) is wrong if any output differs, not only the last."""
    from agile_tvm.tune.export import outputs_match

    want = [np.arange(4, dtype=np.uint8), np.ones(3, np.float32), np.full(2, 2.0, np.float32)]
    assert outputs_match([a.copy() for a in want], want)[0]
    got = [a.copy() for a in want]
    got[1][0] = 1.5
    ok, why = outputs_match(got, want)
    assert not ok and "parameter 1" in why


# ---- the model check of `agile-tvm schedules export --model` (agile_tvm.tune.model_check) --------------------------
def _fake_check(prefill: float, decode: float, diff: float = 0.0, wins: float = 1.0):
    from agile_tvm.tune.model_check import ModelCheck

    return ModelCheck(speedup={"prefill": prefill, "decode": decode},
                      spread={"prefill": (prefill, prefill), "decode": (decode, decode)},
                      wins={"prefill": wins, "decode": wins}, rounds=3,
                      applied="tuned records: 2 of 2", max_logit_diff=diff, logit_scale=10.0, tokens_match=True)


def test_model_check_phases_and_gate(specs):
    """Decode kernels (m = 1) are judged by the model's decode speed, prefill proxies by its prefill speed; a
    phase below the gain loses its records, the other keeps them; so does a phase whose median gain is not
    consistent over the rounds (this machine's noise); a build that computes something else loses all."""
    from agile_tvm.tune.model_check import gate, phase_of

    decode = next(iter(_decode(specs)))
    prefill = next(n for n in specs if n not in _decode(specs))
    assert phase_of(decode, specs) == "decode" and phase_of(prefill, specs) == "prefill"
    assert phase_of("w4a8_n576_k576_m1", {}) == "decode" and phase_of("w4a8_n576_k576_m128", {}) == "prefill"
    kept, dropped = gate([decode, prefill], specs, _fake_check(prefill=1.10, decode=0.97), 1.02)
    assert kept == [prefill] and list(dropped) == [decode] and "decode 0.970x" in dropped[decode]
    kept, dropped = gate([decode, prefill], specs, _fake_check(prefill=1.10, decode=1.05, wins=0.6), 1.02)
    assert not kept and "faster in 60% of 3 rounds" in dropped[prefill]
    kept, dropped = gate([decode, prefill], specs, _fake_check(prefill=1.10, decode=1.05, diff=0.5), 1.02)
    assert not kept and all("differs from the hand-scheduled one" in why for why in dropped.values())


def test_model_check_times_both_builds_of_the_checkpoint(ckpt, specs, tmp_path):
    """The real measurement on the tiny checkpoint: the candidate build applies the record (one decode kernel,
    parallel float tile: same sums), so its logits and tokens equal the hand build's; both phases are timed."""
    from agile_tvm.tune.model_check import measure_in_model

    name = next(n for n, s in _decode(specs).items() if s["wbits"] == 4 and not s["options"].get("outs"))
    _write_record(tmp_path / "cand", specs[name])
    check = measure_in_model(ckpt, X86, tmp_path / "cand", rounds=2, prefill_tokens=64, decode_tokens=4,
                             log=lambda m: None)
    assert check.applied.startswith("tuned records: 1 of ")
    assert check.max_logit_diff == 0.0 and check.same_model and check.tokens_match
    assert check.rounds == 2 and all(v > 0 for v in check.speedup.values())


def test_model_check_refuses_records_of_another_model(ckpt, specs, tmp_path):
    """Records none of whose kernels the checkpoint has (another model's) cannot be judged in it: a clear error."""
    from agile_tvm.tune.model_check import measure_in_model

    name = next(n for n, s in _decode(specs).items() if s["wbits"] == 4)
    other = dict(specs[name], N=specs[name]["N"] * 2)  # a shape this model does not have
    _write_record(tmp_path / "cand", other)
    with pytest.raises(UserError, match="none of the records .* applies to the kernels of"):
        measure_in_model(ckpt, X86, tmp_path / "cand", rounds=1, prefill_tokens=16, decode_tokens=2,
                         log=lambda m: None)


def test_schedules_export_with_model_ships_only_what_the_model_check_passed(ckpt, specs, tmp_path):
    """`schedules export --model`: the tuned kernel reaches the model check, and each kernel ends up shipped or
    skipped exactly as its phase's measured speedup says (consistent whichever way this noisy machine measures)."""
    import json

    from agile_tvm.tune import records
    from agile_tvm.tune.export import MIN_GAIN, export_schedules
    from agile_tvm.tune.workloads import write_kernel_specs

    name = next(n for n, s in _decode(specs).items() if s["wbits"] == 4 and not s["options"].get("outs"))
    logs = tmp_path / "logs"
    _write_record(logs, specs[name])
    write_kernel_specs(logs, {name: specs[name]})
    (logs / "curve.jsonl").write_text(json.dumps({"task": name, "t": 0.0, "gflops": 1.0}) + "\n")
    out = tmp_path / "sched" / X86
    manifest = export_schedules(X86, work_dir=logs, out_dir=out, beat_hand=False, model=ckpt, model_rounds=2,
                                log=lambda m: None)
    check = manifest["model_check"]
    assert check["checkpoint"] == str(ckpt) and check["applied"].startswith("tuned records: 1 of")
    shipped = (check["speedup"]["decode"] >= MIN_GAIN and check["wins"]["decode"] >= check["min_win_share"]
               and check["same_model"])
    assert (name in manifest["kernels"]) == shipped and (name in manifest["skipped"]) != shipped
    if not shipped:
        assert "decode" in manifest["skipped"][name]["model"]
    _, n_records = records.check_database_files(out)
    assert n_records == int(shipped)
    assert json.loads((out / "manifest.json").read_text())["model_check"]["rounds"] == 2
