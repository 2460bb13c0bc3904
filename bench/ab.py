"""Paired figures of two or more revisions of django-pubsub, taken in turn.

    python bench/ab.py --rev 8effc41 --rev HEAD --db postgres --figure dispatch [--rounds 3]

Each revision is checked out into a temporary git worktree (``--rev .`` is this checkout as
it stands, uncommitted changes included), and gets this checkout's harness (bench/ours.py,
raw.py, benchapp and benchproject), so that every revision is measured the same way and
figures added since are there too. Then, round after round, bench/ours.py measures the
figure once per revision, in turn, so that the machine's drift (these machines are
noisy: the disk's commit time changes by a factor of two within minutes) falls on every
revision alike. It prints each round's values and each revision's median and its ratio
to the first revision's, round by round, and writes them to bench/results/ab-*.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


HARNESS = ("ours.py", "raw.py", "benchapp", "benchproject")


def checkout(rev: str, into: Path) -> Path:
    if rev == ".":
        return ROOT
    path = into / rev.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True
    )
    for name in HARNESS:
        source, target = ROOT / "bench" / name, path / "bench" / name
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    return path


def measure(tree: Path, db: str, figure: str, n: int | None) -> dict[str, Any]:
    command = [sys.executable, str(tree / "bench" / "ours.py"), "--db", db, "--figure", figure]
    command += ["--n", str(n)] if n else []
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=7200)
    if done.returncode:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", action="append", required=True, help="git revision, or .")
    parser.add_argument("--db", choices=["postgres", "sqlite"], required=True)
    parser.add_argument("--figure", required=True)
    parser.add_argument("--n", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--field", default="value", help="the figure's field to compare")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    trees = {rev: checkout(rev, work) for rev in args.rev}
    rounds: list[dict[str, Any]] = []
    try:
        for round_ in range(args.rounds):
            # Each round starts with another revision, so none is always measured first.
            order = args.rev[round_ % len(args.rev) :] + args.rev[: round_ % len(args.rev)]
            taken = {rev: measure(trees[rev], args.db, args.figure, args.n) for rev in order}
            rounds.append(taken)
            first = taken[args.rev[0]][args.field]
            print(
                f"round {round_ + 1}: "
                + ", ".join(
                    f"{rev} {taken[rev][args.field]:.4g} ({taken[rev][args.field] / first:.3f})"
                    for rev in args.rev
                ),
                flush=True,
            )
    finally:
        for tree in trees.values():
            if tree != ROOT:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False,
                )
    medians = {rev: statistics.median(r[rev][args.field] for r in rounds) for rev in args.rev}
    ratios = {
        rev: [r[rev][args.field] / r[args.rev[0]][args.field] for r in rounds] for rev in args.rev
    }
    for rev in args.rev:
        paired = ", ".join(f"{ratio:.3f}" for ratio in ratios[rev])
        print(f"{rev}: median {medians[rev]:.4g}; paired ratios to {args.rev[0]}: {paired}")
    out = ROOT / "bench" / "results" / f"ab-{args.figure}-{args.db}-{int(time.time())}.json"
    out.write_text(json.dumps({"args": vars(args), "rounds": rounds, "medians": medians}, indent=1))
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
