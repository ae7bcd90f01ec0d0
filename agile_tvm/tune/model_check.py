"""Ship tuned records only when the model runs faster with them, not just their kernels.

A record that beats the hand schedule on its kernel alone can still lose in the model. Measured in session 7 on
SmolLM2 (x86-avx2, 2 threads): 13 records 1.03-1.26x faster than the hand schedules alone made the prefill
0.97-0.985x and decode 0.97x as fast. In the model a kernel's inputs and its neighbours' weights share the caches
and the thread pool; a kernel repeated alone on the same inputs sees neither.

So `agile-tvm schedules export --model CKPT` builds the checkpoint's model twice for the target, once with the hand
schedules and once with the candidate records, runs both here round by round, and keeps each phase's records only
when that phase of the model is at least `MIN_GAIN` faster. The prefill kernels are the static M =
`PREFILL_PROXY_M` proxies; the decode kernels have m = 1. Prefill time depends only on the prefill kernels and
decode time only on the decode ones, so one pair of builds judges both groups.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agile_tvm.errors import UserError

PHASES = ("prefill", "decode")
#: largest prefill-logit difference (relative to the largest logit) between the two builds that still counts as the
#: same model: float summation order moves logits by ~1e-5 relative; a wrong kernel by far more
LOGIT_TOLERANCE = 1e-2
#: the decode timing's prompt; decode steps follow it
DECODE_PROMPT = 16
#: share of rounds in which the tuned build must be the faster one: this machine's speed drifts by 20-30% within
#: minutes (one 7-round check of the run-3 records measured prefill 1.033x with rounds from 0.60x to 1.27x), so a
#: median alone passes noise
MIN_WIN_SHARE = 0.75


def phase_of(name: str, specs: dict) -> str:
    """"decode" for a kernel with one row (m = 1), "prefill" for the rest (the M = PREFILL_PROXY_M proxies, v1
    prefill chunks)."""
    from agile_tvm.tune.workloads import parse_linear_name

    spec = specs.get(name)
    if spec is not None:
        m = spec["options"].get("m")
    else:
        parsed = parse_linear_name(name)
        m = parsed[3] if parsed else None
    return "decode" if m == 1 else "prefill"


@dataclass
class ModelCheck:
    """The two builds compared here: per phase, the median over rounds of (hand time / tuned time), its range, and
    the share of rounds the tuned build won."""
    speedup: dict[str, float]
    spread: dict[str, tuple[float, float]]
    wins: dict[str, float]
    rounds: int
    applied: str                  # the tuned build's "tuned records: X of Y ..." line
    max_logit_diff: float         # prefill logits, tuned vs hand
    logit_scale: float            # max |logit| of the hand build
    tokens_match: bool            # greedy decode tokens, tuned vs hand

    @property
    def same_model(self) -> bool:
        """Whether the tuned build computes what the hand build does, up to float summation order: every record was
        checked on its kernel alone, so a gross difference here is a miscompile in context (notes: tensorized
        schedules can miscompile silently), and then no record ships. Greedy tokens may differ on a near tie."""
        return self.max_logit_diff <= LOGIT_TOLERANCE * max(self.logit_scale, 1.0)

    def passes(self, phase: str, min_gain: float) -> bool:
        """Faster by `min_gain` at the median and in at least MIN_WIN_SHARE of the rounds."""
        return self.same_model and self.speedup[phase] >= min_gain and self.wins[phase] >= MIN_WIN_SHARE

    def summary(self, phase: str) -> str:
        lo, hi = self.spread[phase]
        return (f"{phase} {self.speedup[phase]:.3f}x ({lo:.2f}-{hi:.2f}, faster in {self.wins[phase]:.0%} of "
                f"{self.rounds} rounds)")

    def as_dict(self) -> dict:
        return {"speedup": {p: round(v, 4) for p, v in self.speedup.items()},
                "spread": {p: [round(lo, 4), round(hi, 4)] for p, (lo, hi) in self.spread.items()},
                "wins": {p: round(v, 4) for p, v in self.wins.items()}, "min_win_share": MIN_WIN_SHARE,
                "rounds": self.rounds, "applied": self.applied, "max_logit_diff": self.max_logit_diff,
                "logit_scale": self.logit_scale, "same_model": self.same_model, "tokens_match": self.tokens_match}


@contextmanager
def _schedules_root(root: Path):
    """Point the frontend's `schedules/` lookup (`records.schedules_root`) at `root` for one build."""
    old = os.environ.get("AGILE_TVM_SCHEDULES")
    os.environ["AGILE_TVM_SCHEDULES"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("AGILE_TVM_SCHEDULES", None)
        else:
            os.environ["AGILE_TVM_SCHEDULES"] = old


def _applied_count(schedules_line: str) -> int:
    """X of the export manifest's 'tuned records: X of Y linear kernels ...' (`frontend.compile`)."""
    found = re.search(r"tuned records: (\d+) of", schedules_line or "")
    return int(found.group(1)) if found else 0


def measure_in_model(ckpt, target_name: str, records_dir: Path, *, rounds: int = 11,
                     prefill_tokens: int | None = None, decode_tokens: int = 32, log=print) -> ModelCheck:
    """Build `ckpt` for `target_name` with the hand schedules and with the records in `records_dir` (a
    schedules/<target>/ folder), then time both here, round by round in turn: a prefill of `prefill_tokens`
    (default PREFILL_PROXY_M, at most the model's length) and `decode_tokens` greedy decode steps after a short
    prompt. Each round times hand, tuned, tuned, hand (a drift within the round then weighs on both alike) and
    compares the sums. The caller has set the thread count (`export.measure_on_all_cores`)."""
    from agile_tvm.runtime import load_module
    from agile_tvm.runtime.bench import tvm_decode_rate
    from agile_tvm.runtime.export import export
    from agile_tvm.tune.workloads import PREFILL_PROXY_M

    with tempfile.TemporaryDirectory(prefix="agile-tvm-model-check-") as tmp:
        tmp = Path(tmp)
        root = tmp / "schedules"
        shutil.copytree(records_dir, root / target_name)
        quiet = lambda msg: None  # noqa: E731
        log(f"model check: building {ckpt} for {target_name} with the hand schedules and with the candidates")
        with _schedules_root(root):
            manifest = export(ckpt, target_name, tmp / "tuned", tuned=True, log=quiet)
        applied = manifest.get("schedules", "")
        if _applied_count(applied) == 0:
            raise UserError(f"none of the records in {records_dir} applies to the kernels of {ckpt}: pass the "
                            f"checkpoint that was tuned (`agile-tvm tune --model CKPT`) to --model")
        export(ckpt, target_name, tmp / "hand", tuned=False, log=quiet)
        lms = [load_module(tmp / "hand"), load_module(tmp / "tuned")]
        prefill_tokens = min(prefill_tokens or PREFILL_PROXY_M, lms[0].max_seq_len)
        if DECODE_PROMPT + decode_tokens + 1 > lms[0].max_seq_len:
            raise UserError(f"{ckpt} takes {lms[0].max_seq_len} tokens: too few to time {decode_tokens} decode steps")
        ids = np.random.RandomState(0).randint(0, lms[0].vocab_size, (1, prefill_tokens))
        logits = [lm.step(ids, 0, lm.new_cache())[0] for lm in lms]  # also the warm-up
        prompt = ids[:, :DECODE_PROMPT]
        ratios = {"prefill": [], "decode": []}
        for _ in range(rounds):
            secs = {"prefill": [0.0, 0.0], "decode": [0.0, 0.0]}  # per build: prefill seconds, decode seconds
            for i in (0, 1, 1, 0):
                cache = lms[i].new_cache()
                t0 = time.perf_counter()
                lms[i].step(ids, 0, cache)
                secs["prefill"][i] += time.perf_counter() - t0
                secs["decode"][i] += 1.0 / tvm_decode_rate(lms[i], prompt, decode_tokens)
            for phase, (hand, tuned) in secs.items():
                ratios[phase].append(hand / tuned)
        tokens = [_greedy(lm, prompt, decode_tokens) for lm in lms]
    check = ModelCheck(speedup={p: float(np.median(r)) for p, r in ratios.items()},
                       spread={p: (min(r), max(r)) for p, r in ratios.items()},
                       wins={p: sum(x > 1.0 for x in r) / len(r) for p, r in ratios.items()}, rounds=rounds,
                       applied=applied,
                       max_logit_diff=float(np.abs(logits[1] - logits[0]).max()),
                       logit_scale=float(np.abs(logits[0]).max()), tokens_match=tokens[0] == tokens[1])
    log(f"model check ({applied}): {check.summary('prefill')}, {check.summary('decode')}; prefill logits max "
        f"|diff| {check.max_logit_diff:.3g}, greedy tokens {'the same' if check.tokens_match else 'DIFFER'}")
    return check


def _greedy(lm, prompt, steps: int) -> list[int]:
    last, cache = lm.step(prompt, 0, lm.new_cache())
    out = []
    for i in range(steps):
        out.append(int(np.argmax(last)))
        last, cache = lm.step(np.array([[out[-1]]]), prompt.shape[1] + i, cache)
    return out


def gate(names: list[str], specs: dict, check: ModelCheck, min_gain: float) -> tuple[list[str], dict[str, str]]:
    """(the names whose phase is `min_gain` faster in the model, {dropped name: why})."""
    kept, dropped = [], {}
    for name in names:
        phase = phase_of(name, specs)
        if check.passes(phase, min_gain):
            kept.append(name)
        elif not check.same_model:
            dropped[name] = (f"the model built with the candidates differs from the hand-scheduled one (prefill "
                             f"logits max |diff| {check.max_logit_diff:.3g} of max |logit| {check.logit_scale:.3g})")
        else:
            dropped[name] = (f"the model's {check.summary(phase)} with the candidates is not {min_gain:.2f}x "
                             f"faster than with the hand schedules in {MIN_WIN_SHARE:.0%} of the rounds")
    return kept, dropped
