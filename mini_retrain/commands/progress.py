"""One line that shows how training goes, rewritten in place on a terminal (retrain.py printed 3 lines per step).

    Step 1200/4000 | train accuracy 98.0% | cross-entropy 0.0412 | validation 95.0% (N=100) | 2 s left

`progress_line(total_steps)` returns a function that takes train.train_final_layer's history rows (one per
evaluation, through its `on_evaluation`). Each call writes "\\r" + the line, padded over the previous one; the last
step ends it with a newline. The step lines are only for log files: when stdout is not a terminal the command line
passes no progress function and train.py prints retrain.py's lines instead; --summaries_dir keeps every row either way.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def format_progress(row: dict, total_steps: int, seconds_left: float | None) -> str:
    """The line for one history row {step, train_accuracy, cross_entropy[, validation_accuracy, validation_n]}."""
    parts = [f"Step {row['step'] + 1}/{total_steps}", f"train accuracy {100 * row['train_accuracy']:.1f}%",
             f"cross-entropy {row['cross_entropy']:.4f}"]
    if row.get("validation_accuracy") is not None:
        parts.append(f"validation {100 * row['validation_accuracy']:.1f}% (N={row['validation_n']})")
    if seconds_left is not None:
        parts.append(f"{seconds_left:.0f} s left" if seconds_left < 120 else f"{seconds_left / 60:.0f} min left")
    return " | ".join(parts)


def progress_line(total_steps: int, stream: TextIO | None = None,
                  clock: Callable[[], float] = time.perf_counter) -> Callable[[dict], None]:
    """A function of one history row that rewrites the progress line on `stream` (default: sys.stdout).

    Time left = the time per step so far, counted from the first row (not from the start of the command, which
    includes the bottlenecks), times the steps to go."""
    first: tuple[int, float] | None = None  # (steps done, time) at the first row
    width = 0

    def show(row: dict) -> None:
        nonlocal first, width
        out = stream if stream is not None else sys.stdout
        done, now = row["step"] + 1, clock()
        if first is None:
            first = (done, now)
        last = done >= total_steps
        per_step = (now - first[1]) / (done - first[0]) if done > first[0] else None
        seconds_left = None if last or per_step is None else per_step * (total_steps - done)
        line = format_progress(row, total_steps, seconds_left)
        if last:
            line += f" | done in {now - first[1]:.1f} s"
        out.write("\r" + line.ljust(width) + ("\n" if last else ""))
        out.flush()
        width = len(line)

    return show
