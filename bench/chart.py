"""Draw docs/performance.png from bench/results/results.json (run by bench/run.py).

    python bench/chart.py RESULTS_JSON OUTPUT_PNG

Needs matplotlib, which bench/peers/setup.sh installs in the benchmark's own virtualenv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

BARS = [
    ("raw SQL: claim 100 + mark", "raw/claim_batch"),
    ("django-pubsub", "ours/dispatch"),
    ("django-pubsub, 10 subscriptions", "ours/dispatch_fan"),
    ("django-pubsub, ordered", "ours/dispatch_ordered"),
    ("django-pubsub, 1M history", "ours/dispatch_history"),
    ("procrastinate, concurrency 10", "procrastinate/dispatch-c10"),
    ("procrastinate, 1 worker", "procrastinate/dispatch-c1"),
    ("django-tasks, 10 worker processes", "django_tasks/dispatch-c10"),
    ("django-tasks, 1", "django_tasks/dispatch-c1"),
    ("django-q2, 10 workers", "django_q2/dispatch-c10"),
    ("django-q2, 1", "django_q2/dispatch-c1"),
]
LATENCY = [
    ("django-pubsub", "ours/latency"),
    ("procrastinate", "procrastinate/latency"),
    ("django-tasks", "django_tasks/latency"),
    ("django-q2", "django_q2/latency"),
]


def main(source: Path, output: Path) -> None:
    data = json.loads(source.read_text())
    table = data["table"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [3, 2]})
    labels = [label for label, _ in BARS]
    for offset, (db, color) in enumerate((("postgres", "#336791"), ("sqlite", "#7aa95c"))):
        values = [table.get(f"{key}/{db}", {}).get("median", 0) for _, key in BARS]
        positions = [i + offset * 0.4 for i in range(len(BARS))]
        left.barh(positions, values, height=0.4, color=color, label=db)
    left.set_yticks([i + 0.2 for i in range(len(BARS))], labels)
    left.invert_yaxis()
    left.set_xscale("log")
    left.set_xlabel("messages (deliveries) per second, log scale; median of runs")
    left.set_title("Dispatch throughput, no-op handler, one process")
    left.legend()
    names = [label for label, _ in LATENCY]
    p50 = [table.get(f"{key}/postgres", {}).get("median", 0) for _, key in LATENCY]
    p99 = [table.get(f"{key}/postgres", {}).get("p99", 0) for _, key in LATENCY]
    positions = range(len(LATENCY))
    right.bar([p - 0.2 for p in positions], p50, width=0.4, label="p50", color="#336791")
    right.bar([p + 0.2 for p in positions], p99, width=0.4, label="p99", color="#9bb7d4")
    right.set_xticks(list(positions), names, rotation=20)
    right.set_yscale("log")
    right.set_ylabel("ms from commit to handler start, log scale")
    right.set_title("Latency on PostgreSQL, 20 messages/s")
    right.legend()
    meta = data["meta"]
    fig.suptitle(f"django-pubsub benchmark, {meta['date']} ({meta['machine']})")
    fig.tight_layout()
    fig.savefig(output, dpi=90)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
