"""Write N QM9 test molecules (evenly spaced rows of the test split) to an SDF, the reference set of the physics
checks in benchmarks/results/generation.md ("Physics checks").

    python benchmarks/qm9_test_sdf.py --n 200 --out /tmp/phys/qm9_test200.sdf
    diffgen check /tmp/phys/qm9_test200.sdf --out /tmp/phys

Rows ``round(linspace(0, len(test) - 1, N))`` of ``diffgen.data.qm9.QM9(split="test")``; each record carries the
tags ``qm9_row`` (row in the test split) and ``gdb9_index`` (its 1-based GDB-9 index).
"""
from __future__ import annotations

import argparse

import numpy as np

from diffgen.data.qm9 import QM9
from diffgen.io import write_sdf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    test = QM9(split="test")
    rows = np.round(np.linspace(0, len(test) - 1, args.n)).astype(int)
    mols, props = [], []
    for r in rows.tolist():
        d = test[r]
        mols.append((d.z.numpy(), d.pos.double().numpy()))
        props.append({"qm9_row": r, "gdb9_index": int(d.idx.reshape(-1)[0])})
    write_sdf(args.out, mols, props=props, overwrite=args.overwrite)
    print(f"wrote {args.out} ({len(mols)} QM9 test molecules)")


if __name__ == "__main__":
    main()
