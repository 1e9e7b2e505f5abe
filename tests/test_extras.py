"""Optional dependencies: a missing extra is a one-line error naming the extra, not an ImportError traceback."""
from __future__ import annotations

import sys

import pytest

from diffgen.errors import DiffgenError


def test_missing_openmm_names_the_md_extra(monkeypatch):
    from diffgen.data import md

    monkeypatch.setitem(sys.modules, "openmm", None)  # import openmm now raises ImportError
    with pytest.raises(DiffgenError, match=r"diffgen\[md\]") as info:
        md.system_info()
    assert "\n" not in str(info.value)
