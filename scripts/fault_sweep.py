#!/usr/bin/env python
"""Rerun the fault sweep of docs/reliability.md: every test named in its tables, slow ones included.

    python scripts/fault_sweep.py            # all rows (a few minutes on a small CPU)
    python scripts/fault_sweep.py --fast     # without the tests marked slow
    python scripts/fault_sweep.py --list     # print the pytest node ids only

The tables' last column names the test backing each row as ``file.py::test_name[param]`` (relative to tests/); a row
whose test no longer exists makes pytest fail with "not found", so the document cannot silently drift from the tests.
"""

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "reliability.md")


def node_ids(doc: str = DOC):
    ids = []
    with open(doc) as f:
        for line in f:
            if line.startswith("|"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                for ref in re.findall(r"`([\w/]+\.py::[^`]+)`", cells[-1]):
                    node = os.path.join("tests", ref)
                    if node not in ids:
                        ids.append(node)
    return ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="Skip the tests marked slow.")
    parser.add_argument("--list", action="store_true", help="Print the node ids and stop.")
    args, extra = parser.parse_known_args(argv)
    ids = node_ids()
    if args.list:
        print("\n".join(ids))
        return 0
    print(f"fault sweep: {len(ids)} tests named in {os.path.relpath(DOC, ROOT)}", flush=True)
    marks = "not slow and not gpu" if args.fast else "not gpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", marks, *extra, *ids]
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
