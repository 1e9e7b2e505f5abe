"""Write tests/data/regressor_references.json: the shipped gap regressor's predictions on the first 16 molecules of
the QM9 test split, as computed by the code of the commit that runs this script.

The stored file was written by the code before the checkpoint re-layout (commit 7a05098, where the shipped model
loaded as a Lightning ``RegressionTask`` and ``predict`` lived in ``diffgen.tasks.regression.module``);
``tests/test_regression.py::test_shipped_regressor_predicts_as_before_the_relayout`` checks that the current code
still gives these numbers. Run: ``OMP_NUM_THREADS=1 python tests/data/make_regressor_references.py``.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from diffgen.data.qm9 import QM9

try:  # after the re-layout
    from diffgen.tasks.regression.checkpoints import load_regressor
    from diffgen.tasks.regression.predict import predict
except ImportError:  # before it (commit 7a05098)
    from diffgen.tasks.regression.checkpoints import load_regressor
    from diffgen.tasks.regression.module import predict

OUT = Path(__file__).with_name("regressor_references.json")
N_MOLECULES = 16

if __name__ == "__main__":
    torch.set_num_threads(1)
    ds = QM9(split="test")
    molecules = [(ds[i].z.numpy(), ds[i].pos.numpy()) for i in range(N_MOLECULES)]
    values = predict(load_regressor(), molecules)[:, 0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    OUT.write_text(json.dumps({
        "commit": commit, "split": "test", "rows": list(range(N_MOLECULES)),
        "qm9_idx": [int(ds[i].idx) for i in range(N_MOLECULES)],
        "gap_meV": [float(v) for v in values],  # float64, repr round-trips exactly
    }, indent=1) + "\n")
    print(f"wrote {OUT}")
