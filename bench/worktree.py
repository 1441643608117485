"""For the benchmarks: name this checkout, and run another commit's code from a temporary git worktree."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    """Run git in this repository; its output."""
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def describe_current() -> str:
    """Short commit of this checkout, marked when tracked files differ from it."""
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + ("+changes" if dirty else "")


@contextmanager
def baseline_worktree(rev: str) -> Iterator[tuple[str, Path]]:
    """(short commit, source tree) of `rev`, checked out in a temp directory and removed afterwards.

    Run its code with this checkout's interpreter and `PYTHONPATH=<tree>`: the tree's `monitor` comes before the
    installed one, and it finds its own migrations beside it.
    """
    commit = git("rev-parse", "--short", f"{rev}^{{commit}}")
    temp = Path(tempfile.mkdtemp(prefix="claude-monitor-baseline-"))
    tree = temp / "baseline"
    try:
        git("worktree", "add", "--detach", str(tree), commit)
        yield commit, tree
    finally:
        if tree.exists():
            git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(temp, ignore_errors=True)


def imported_from(pythonpath: Path, cwd: Path) -> Path:
    """Where `import monitor` resolves with PYTHONPATH=pythonpath; SystemExit when not inside it."""
    import os
    import sys

    found = subprocess.run(
        [sys.executable, "-c", "import monitor; print(monitor.__file__)"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(pythonpath)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(pythonpath.resolve()):
        raise SystemExit(f"PYTHONPATH={pythonpath} imports monitor from {found}, not from that tree")
    return Path(found)
