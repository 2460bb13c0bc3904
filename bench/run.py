"""The benchmark harness: django-pubsub against its peers and the database's own limit.

    python3 bench/run.py            # everything, 3 runs per figure (50 to 85 minutes)
    python3 bench/run.py --quick    # small sizes, one run each: a smoke test of the harness

It sets up what it needs: the project's virtualenv (.venv, as .ci/run makes it) and the
peers' own virtualenv (bench/.peers/venv, by bench/peers/setup.sh; the peers are never
project dependencies). Then it runs every figure on PostgreSQL (127.0.0.1:5432) and SQLite,
each run in fresh processes on a fresh database, and writes:

- bench/results/results.json: every run's figures, with versions and settings;
- bench/results/results.md and the results section of docs/performance.md: medians, the
  spread (lowest to highest run), and each target's ratio, from this one run;
- docs/performance.png: the chart.

Figures come from bench/ours.py (ours), bench/raw.py (plain psycopg / sqlite3) and
bench/peers/measure.py (procrastinate, django-tasks, django-q2); each prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
PEERS_PY = BENCH / ".peers" / "venv" / "bin" / "python"
RESULTS = BENCH / "results"
DOC = ROOT / "docs" / "performance.md"
CHART = ROOT / "docs" / "performance.png"
DBS = ("postgres", "sqlite")
MARK_START, MARK_END = "<!-- results: start -->", "<!-- results: end -->"

# (source, figure, sizes for a full run and for --quick); None: the script's default.
OURS = [
    ("publish_single", None, 300),
    ("publish_many", None, 5_000),
    ("dispatch", None, 2_000),
    ("dispatch_fan", None, 1_000),
    ("dispatch_ordered", None, 1_000),
    ("dispatch_history", None, 2_000),
    ("latency", None, 40),
    ("idle_cpu", None, 5),
    ("memory", None, 20_000),
]
RAW = [("insert_single", None, 500), ("insert_batch", None, 10_000), ("claim_batch", None, 10_000)]
PEERS = ["procrastinate", "django_tasks", "django_q2"]
# Peers handle a few hundred jobs a second: 5,000 keeps each run near a minute.
PEER_DISPATCH_N, PEER_QUICK_N = 5_000, 300
PEER_CONCURRENCY = (1, 10)
MATPLOTLIB = "matplotlib==3.10.9"


def ensure_environments() -> None:
    if not VENV_PY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(ROOT / ".venv")], check=True)
        pip = [str(VENV_PY), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    subprocess.run(["bash", str(BENCH / "peers" / "setup.sh")], check=True)
    # The chart is drawn in the benchmark's virtualenv too: no project dependency.
    has_plot = subprocess.run([str(PEERS_PY), "-c", "import matplotlib"], capture_output=True)
    if has_plot.returncode:
        subprocess.run([str(PEERS_PY), "-m", "pip", "install", "-q", MATPLOTLIB], check=True)


def measure(python: Path, script: str, args: list[str], timeout: float = 3600) -> dict[str, Any]:
    """Run one measurement; its last line of output is its JSON result."""
    command = [str(python), str(BENCH / script), *args]
    print("  $", " ".join(command[1:]), flush=True)
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(lines[-1])
    print("   ", summary(result), flush=True)
    return result


def summary(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    extra = f" p99 {result['p99']:.1f}" if "p99" in result else ""
    return f"{result.get('value', float('nan')):,.1f} {result.get('unit', '')}{extra}"


def run_all(repeat: int, quick: bool, dbs: list[str], peers: bool) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {}

    def record(key: str, result: dict[str, Any]) -> None:
        runs.setdefault(key, []).append(result)

    for db in dbs:
        for _ in range(repeat):
            for figure, n, quick_n in OURS:
                args = ["--db", db, "--figure", figure]
                size = quick_n if quick else n
                record(f"ours/{figure}/{db}", measure(VENV_PY, "ours.py", args + n_arg(size)))
            for figure, n, quick_n in RAW:
                args = ["--db", db, "--figure", figure, *n_arg(quick_n if quick else n)]
                record(f"raw/{figure}/{db}", measure(VENV_PY, "raw.py", args))
            if not peers:
                continue
            for peer in PEERS:
                if peer == "procrastinate" and db == "sqlite":
                    continue  # PostgreSQL only
                size = PEER_QUICK_N if quick else PEER_DISPATCH_N
                for concurrency in PEER_CONCURRENCY:
                    args = ["--peer", peer, "--db", db, "--figure", "dispatch"]
                    args += ["--n", str(size), "--concurrency", str(concurrency)]
                    key = f"{peer}/dispatch-c{concurrency}/{db}"
                    record(key, measure(PEERS_PY, "peers/measure.py", args))
                args = ["--peer", peer, "--db", db, "--figure", "latency"]
                args += ["--n", "40"] if quick else []
                record(f"{peer}/latency/{db}", measure(PEERS_PY, "peers/measure.py", args))
    return runs


def n_arg(n: int | None) -> list[str]:
    return [] if n is None else ["--n", str(n)]


def medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for key, results in runs.items():
        good = [r for r in results if "value" in r and "error" not in r]
        if not good:
            first = results[0]
            table[key] = {"error": first.get("error") or first.get("skipped") or "no result"}
            continue
        values = [r["value"] for r in good]
        row = {
            "median": statistics.median(values),
            "low": min(values),
            "high": max(values),
            "runs": len(values),
            "unit": good[0].get("unit", ""),
        }
        for field in ("p99", "paired_ratio"):
            if field in good[0]:
                row[field] = statistics.median(r[field] for r in good)
        table[key] = row
    return table


def value(table: dict[str, dict[str, Any]], key: str, field: str = "median") -> float | None:
    row = table.get(key)
    return None if row is None or field not in row else float(row[field])


def targets(table: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    """(target, what this run measured, met?) for every target of the issue."""
    out: list[tuple[str, str, bool | None]] = []

    def check(name: str, measured: float | None, goal: float, fmt: str, above: bool = True) -> None:
        if measured is None:
            out.append((name, "not measured", None))
            return
        met = measured >= goal if above else measured <= goal
        out.append((name, fmt.format(measured), met))

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    pg_dispatch = value(table, "ours/dispatch/postgres")
    best_peer = max(
        (
            v
            for k in table
            if k.endswith("/postgres") and "/dispatch-c" in k
            for v in [value(table, k)]
            if v is not None
        ),
        default=None,
    )
    check("PostgreSQL dispatch ≥ 10,000/s", pg_dispatch, 10_000, "{:,.0f}/s")
    check(
        "PostgreSQL dispatch ≥ 25% of raw claim-and-mark",
        ratio(pg_dispatch, value(table, "raw/claim_batch/postgres")),
        0.25,
        "{:.0%}",
    )
    check("PostgreSQL dispatch ≥ 20x the best peer", ratio(pg_dispatch, best_peer), 20, "{:.1f}x")
    check("SQLite dispatch ≥ 10,000/s", value(table, "ours/dispatch/sqlite"), 10_000, "{:,.0f}/s")
    for db in DBS:
        check(
            f"{db}: 10 subscriptions ≥ 80% of one",
            ratio(value(table, f"ours/dispatch_fan/{db}"), value(table, f"ours/dispatch/{db}")),
            0.8,
            "{:.0%}",
        )
        check(
            f"{db}: ordered ≥ 2,000/s",
            value(table, f"ours/dispatch_ordered/{db}"),
            2_000,
            "{:,.0f}/s",
        )
    # publish_single takes plain inserts in turn with its own publishes (bench/ours.py): the
    # disk's commit time drifts too much between the two figures' runs to compare them.
    check(
        "PostgreSQL publish ≥ 80% of raw insert + commit (taken in turn)",
        value(table, "ours/publish_single/postgres", "paired_ratio"),
        0.8,
        "{:.0%}",
    )
    check(
        "PostgreSQL publish_many ≥ 50% of raw batched insert",
        ratio(
            value(table, "ours/publish_many/postgres"), value(table, "raw/insert_batch/postgres")
        ),
        0.5,
        "{:.0%}",
    )
    check(
        "SQLite publish_many ≥ 20,000/s",
        value(table, "ours/publish_many/sqlite"),
        20_000,
        "{:,.0f}/s",
    )
    p50, p99 = value(table, "ours/latency/postgres"), value(table, "ours/latency/postgres", "p99")
    peer_p50 = min(
        (v for p in PEERS for v in [value(table, f"{p}/latency/postgres")] if v is not None),
        default=None,
    )
    peer_p99 = min(
        (v for p in PEERS for v in [value(table, f"{p}/latency/postgres", "p99")] if v is not None),
        default=None,
    )
    check("PostgreSQL latency p50 ≤ 5 ms", p50, 5, "{:.1f} ms", above=False)
    check(
        "PostgreSQL latency p50 below the best peer's",
        ratio(p50, peer_p50),
        1,
        "{:.2f}x the best peer",
        above=False,
    )
    check(
        "PostgreSQL latency p99 below the best peer's",
        ratio(p99, peer_p99),
        1,
        "{:.2f}x the best peer",
        above=False,
    )
    # SQLite wakes on another process's commit (PRAGMA data_version), not on its poll.
    check(
        "SQLite latency p50 ≤ 5 ms",
        value(table, "ours/latency/sqlite"),
        5,
        "{:.1f} ms",
        above=False,
    )
    check(
        "SQLite latency p99 ≤ 20 ms",
        value(table, "ours/latency/sqlite", "p99"),
        20,
        "{:.1f} ms",
        above=False,
    )
    for db in DBS:
        check(
            f"{db}: idle dispatcher ≤ 5% of a core",
            value(table, f"ours/idle_cpu/{db}"),
            5,
            "{:.2f}%",
            above=False,
        )
    for db in DBS:
        check(
            f"{db}: memory growth after warm-up ≤ 10%",
            value(table, f"ours/memory/{db}"),
            10,
            "{:.1f}%",
            above=False,
        )
        check(
            f"{db}: large history ≥ 80% of small",
            ratio(value(table, f"ours/dispatch_history/{db}"), value(table, f"ours/dispatch/{db}")),
            0.8,
            "{:.0%}",
        )
    return out


def markdown(table: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Run of {meta['date']} on {meta['machine']}, {meta['runs']} run(s) per figure; "
        f"median (lowest - highest).",
        "",
        "| figure | PostgreSQL | SQLite |",
        "|---|---|---|",
    ]
    order = ["ours", "raw", *PEERS]
    keys = sorted(
        {key.rsplit("/", 1)[0] for key in table}, key=lambda k: (order.index(k.split("/")[0]), k)
    )
    for key in keys:
        cells = [cell(table.get(f"{key}/{db}")) for db in DBS]
        lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
    lines += ["", "| target | this run | met |", "|---|---|---|"]
    for name, measured, met in targets(table):
        mark = "n/a" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {name} | {measured} | {mark} |")
    versions = ", ".join(f"{name} {v}" for name, v in meta["versions"].items())
    lines += ["", f"Versions: {versions}.", ""]
    lines += [f"Settings: {meta['settings']['ours']}; peers: "]
    lines[-1] += f"{meta['settings']['peer_dispatch_n']:,} jobs per dispatch run."
    lines += ["Every run's figures and each one's settings: `bench/results/results.json`.", ""]
    return "\n".join(lines)


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return f"not measured ({row['error'][:60]})"
    unit = row["unit"]
    if unit == "ms":
        return f"p50 {row['median']:.1f} ms, p99 {row.get('p99', float('nan')):.1f} ms"
    if unit.startswith("%"):
        return f"{row['median']:.1f}% ({row['low']:.1f} - {row['high']:.1f})"
    return f"{row['median']:,.0f} {unit} ({row['low']:,.0f} - {row['high']:,.0f})"


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    start, end = doc.index(MARK_START) + len(MARK_START), doc.index(MARK_END)
    DOC.write_text(doc[:start] + "\n" + text + doc[end:])


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for python, names in ((VENV_PY, ["django", "psycopg"]), (PEERS_PY, PEERS)):
        for name in names:
            dist = {"django_tasks": "django-tasks", "django_q2": "django-q2"}.get(name, name)
            code = f"from importlib.metadata import version; print(version({dist!r}))"
            done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
            found[dist] = done.stdout.strip() or "unknown"
    server = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "SHOW server_version"],
        capture_output=True,
        text=True,
    )
    found["postgresql"] = server.stdout.strip() or "unknown"
    import sqlite3

    found["sqlite"] = sqlite3.sqlite_version
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark django-pubsub against its peers.")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each")
    parser.add_argument("--repeat", type=int, help="runs per figure (default 3, 1 with --quick)")
    parser.add_argument("--db", choices=DBS, action="append", help="only this database")
    parser.add_argument("--no-peers", action="store_true", help="skip the peers")
    parser.add_argument(
        "--no-write", action="store_true", help="print the table; leave docs/ as it is"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: rewrite the tables and chart from bench/results/results.json",
    )
    args = parser.parse_args()
    if args.render:
        saved = json.loads((RESULTS / "results.json").read_text())
        publish_results(saved["meta"], saved["table"], saved["runs"])
        return
    repeat = args.repeat or (1 if args.quick else 3)
    ensure_environments()
    started = time.monotonic()
    runs = run_all(repeat, args.quick, args.db or list(DBS), not args.no_peers)
    table = medians(runs)
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os_cpus()} CPUs, PostgreSQL over loopback",
        "runs": repeat,
        "quick": args.quick,
        "minutes": round((time.monotonic() - started) / 60, 1),
        "versions": versions(),
        "settings": {
            "ours": "library defaults: WORKERS 4, BATCH_SIZE 1000, POLL_INTERVAL 0.2; "
            "SQLite in WAL mode with synchronous FULL; no-op handlers",
            "peer_dispatch_n": PEER_QUICK_N if args.quick else PEER_DISPATCH_N,
        },
    }
    if args.no_write:
        print("\n" + markdown(table, meta))
        return
    publish_results(meta, table, runs)


def publish_results(
    meta: dict[str, Any], table: dict[str, dict[str, Any]], runs: dict[str, Any]
) -> None:
    text = markdown(table, meta)
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "results.json").write_text(
        json.dumps({"meta": meta, "table": table, "runs": runs}, indent=1) + "\n"
    )
    (RESULTS / "results.md").write_text(text)
    write_doc(text)
    subprocess.run(
        [str(PEERS_PY), str(BENCH / "chart.py"), str(RESULTS / "results.json"), str(CHART)],
        check=True,
    )


def os_cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
