"""The package as a user installs it: a regular (non-editable) install ships the saved splits and
loads them by name from anywhere, away from this checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_package_loads_saved_splits_by_name(tmp_path):
    target = tmp_path / "site"
    env = dict(os.environ, SPARQ_EXT_NO_BUILD="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, env=env, cwd=tmp_path)
    assert not (target / "sparq_ext" / "__editable__").exists()
    script = (
        "import sparq_ext, pathlib\n"
        f"assert pathlib.Path(sparq_ext.__file__).is_relative_to({str(target)!r}), sparq_ext.__file__\n"
        "assert sparq_ext.saved_splits() == {'smollm2-135m': [2.0, 4.0, 8.0, 16.0]}, sparq_ext.saved_splits()\n"
        "split = sparq_ext.Split.load('smollm2-135m', ratio=8)\n"
        "split.check(64, 30)\n"
        "print(sorted(split.lengths))\n"
    )
    run_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run_env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         env=run_env, cwd=tmp_path)
    assert out.stdout.strip() == "[1024, 2048, 4096, 8192]"
