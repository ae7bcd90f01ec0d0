"""Tuning progress: a tqdm bar with ETA, a per-trial curve log (`curve.jsonl`), board-loss reports, the plot.

`curve.jsonl` gets one line per measured candidate (task, GFLOP/s or the error kind), appended right after
MetaSchedule commits the batch to the database; a resumed run counts its finished trials from it.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

CURVE_FILE = "curve.jsonl"


def _last_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return lines[-1][:240] if lines else ""


def read_curve(work_dir: Path) -> list[dict]:
    path = Path(work_dir) / CURVE_FILE
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that trial was in flight
    return rows


def trials_done(work_dir: Path) -> dict[str, int]:
    done: dict[str, int] = defaultdict(int)
    for row in read_curve(work_dir):
        done[row.get("task", "?")] += 1
    return dict(done)


def best_gflops(work_dir: Path) -> dict[str, float]:
    best: dict[str, float] = {}
    for row in read_curve(work_dir):
        g = row.get("gflops")
        if g is not None:
            best[row["task"]] = max(best.get(row["task"], 0.0), g)
    return best


def make_callback(work_dir: Path, tasks: list, flops: dict[str, float], bar, board_status):
    """A MetaSchedule measure callback (runs after AddToDatabase) that logs, updates the bar, and notices boards
    dying. `board_status(kind, msg)` is called for runs whose session was lost or found no board."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.ir.utils import derived_object

    from agile_tvm.tune.runner import classify_error

    curve_path = Path(work_dir) / CURVE_FILE

    @derived_object
    class ProgressCallback(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.best = best_gflops(work_dir)
            self.errors = defaultdict(int)

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            name = tasks[task_id]
            lines = []
            for b, r in zip(builder_results, runner_results):
                row = {"t": round(time.time(), 2), "task": name, "gflops": None}
                if b.error_msg:
                    row["error"] = "build"
                    row["detail"] = _last_line(str(b.error_msg))
                elif r.error_msg:
                    kind = classify_error(str(r.error_msg))
                    row["error"] = kind
                    row["detail"] = _last_line(str(r.error_msg))
                    if kind in ("board-lost", "no-board"):
                        board_status(kind, str(r.error_msg))
                else:
                    secs = [float(s) for s in r.run_secs]
                    mean = sum(secs) / len(secs)
                    row["gflops"] = round(flops[name] / mean / 1e9, 3) if mean > 0 else None
                    if row["gflops"] is not None:
                        self.best[name] = max(self.best.get(name, 0.0), row["gflops"])
                if "error" in row:
                    self.errors[row["error"]] += 1
                lines.append(json.dumps(row))
            with open(curve_path, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            bar.update(len(lines))
            bar.set_postfix_str(f"{name}: best {self.best.get(name, 0):.1f} GFLOP/s"
                                + (f", failed {sum(self.errors.values())}" if self.errors else ""))

    return ProgressCallback()


def plot_curve(work_dir: Path, title: str) -> Path | None:
    """Best-so-far GFLOP/s against trials, one line per task -> tuning_curve.png (atomic write)."""
    rows = read_curve(work_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        s = series[row["task"]]
        prev = s[-1] if s else 0.0
        s.append(max(prev, row.get("gflops") or 0.0))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, s in sorted(series.items()):
        ax.plot(range(1, len(s) + 1), s, label=name)
    ax.set_xlabel("trials")
    ax.set_ylabel("best GFLOP/s so far")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out = Path(work_dir) / "tuning_curve.png"
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out)
    return out
