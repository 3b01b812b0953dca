"""The research tools still run: the auto-split window evaluation's statistics and pooling, the
8-bit r-against-k sweep's points, and the CPU memory-floor program that docs/cpu-performance.md
cites. No timing asserts."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparq_ext.split import Split

RESEARCH = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sw():
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("eval_split_windows", RESEARCH / "eval_split_windows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_windows_places_disjoint_windows_and_refuses_too_many(sw):
    starts = sw.window_starts(total=1000, need=90, windows=10)
    assert len(starts) == 10 and starts[0] == 0 and starts[-1] + 90 <= 1000
    assert all(b - a >= 90 for a, b in zip(starts, starts[1:]))  # disjoint
    assert sw.window_starts(total=100, need=90, windows=1) == [0]
    with pytest.raises(ValueError, match="--windows 12"):
        sw.window_starts(total=1000, need=90, windows=12)


def test_split_windows_summary_pools_losses_and_bootstraps_the_ratio(sw):
    W = 6
    dense = [0.1 * w for w in range(W)]  # windows differ; losses are relative to each window's dense
    cell = {"dense_window_nll": dense,
            "window_nll": {"even": [d + math.log(1.2) for d in dense], "auto": [d + math.log(1.05) for d in dense]}}
    s = sw.summarise(cell, torch.Generator().manual_seed(0))
    assert s["loss_pct"]["even"] == pytest.approx(20.0, rel=1e-4)
    assert s["loss_pct"]["auto"] == pytest.approx(5.0, rel=1e-3)
    assert s["auto_over_even"] == pytest.approx(0.25, rel=1e-3)
    assert s["auto_over_even_ci95"] == pytest.approx([0.25, 0.25], rel=1e-3)
    assert s["p_goal"] == 1.0 and s["nll_auto_minus_even"] == pytest.approx(math.log(1.05 / 1.2), rel=1e-4)
    # no loss for the even split: the ratio is undefined and no resample counts as meeting the goal
    cell["window_nll"]["even"] = dense
    s = sw.summarise(cell, torch.Generator().manual_seed(0))
    assert s["auto_over_even"] is None and s["auto_over_even_ci95"] is None and s["p_goal"] == 0.0


def test_split_windows_pools_texts_with_a_bootstrap_stratified_by_text(sw, tmp_path):
    def cell(n, even, auto, dense0=0.0):
        dense = [dense0 + 0.1 * w for w in range(n)]
        return {"context": 8000, "ratio": 4, "dense_window_nll": dense,
                "window_nll": {"even": [d + math.log(even) for d in dense],
                               "auto": [d + math.log(auto) for d in dense]}}

    a, b = cell(4, 1.2, 1.05), cell(2, 1.1, 1.1, dense0=2.0)  # auto gains on text a only
    s = sw.summarise([a, b], torch.Generator().manual_seed(0))
    even = math.exp((4 * math.log(1.2) + 2 * math.log(1.1)) / 6) - 1
    auto = math.exp((4 * math.log(1.05) + 2 * math.log(1.1)) / 6) - 1
    assert s["loss_pct"]["even"] == pytest.approx(100 * even, rel=1e-4)
    assert s["auto_over_even"] == pytest.approx(auto / even, rel=1e-3)
    # Every resample keeps 4 windows of a and 2 of b, each text's windows alike: no spread. A
    # bootstrap over the pooled windows (not by text) would draw 6 of a or 6 of b at times.
    lo, hi = s["auto_over_even_ci95"]
    assert lo == pytest.approx(auto / even, rel=1e-3) and hi == pytest.approx(auto / even, rel=1e-3)
    # One cell alone, or as a one-element list, bootstraps the same.
    assert sw.summarise([a], torch.Generator().manual_seed(1)) == sw.summarise(a, torch.Generator().manual_seed(1))

    def split(lengths):  # per-length entries of a split at ratio 4
        return Split(4.0, {length: {0: (r, 4.0)} for length, r in lengths.items()}).to_json()

    def write(name, text, split_json):
        meta = {"text": text, "commit": "abc1234", "splits": {"4": split_json}, "args": {"tokens": 128}}
        c = dict(a if text == "t1" else b)
        c["summary"] = sw.summarise(c, torch.Generator().manual_seed(0))
        path = tmp_path / name
        path.write_text(json.dumps({"meta": meta, "cells": {"8000/4": c}}))
        return path

    p1 = write("r1.json", "t1", split({2048: 8, 8192: 2}))
    p2 = write("r2.json", "t2", split({1024: 16, 2048: 8, 8192: 2}))  # a length 8K does not use
    table = sw.pool_runs([p1, p2], tmp_path / "pooled")
    assert "t1 4 + t2 2" in table
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    assert pooled["cells"]["8000/4"]["windows"] == [4, 2]
    assert pooled["cells"]["8000/4"]["summary"]["auto_over_even"] == pytest.approx(auto / even, rel=1e-3)
    with pytest.raises(SystemExit, match="another split"):  # another calibration at 8K: not pooled
        sw.pool_runs([p1, write("r3.json", "t2", split({2048: 8, 8192: 4}))], tmp_path / "bad")
    old = json.loads(p2.read_text())
    del old["meta"]["splits"]  # written by an older version: it cannot say what it decoded
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="records no split"):
        sw.pool_runs([p1, tmp_path / "old.json"], tmp_path / "changed")
    with pytest.raises(SystemExit, match="at least two"):
        sw.pool_runs([p1], tmp_path / "one")


def test_split_windows_checks_its_arguments_before_loading_the_model(sw, monkeypatch, capsys, tmp_path):
    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["eval_split_windows.py", "--out", str(tmp_path), *argv])
        with pytest.raises(SystemExit) as exit_info:
            sw.main()
        return exit_info.value, capsys.readouterr().err

    monkeypatch.setattr(sw, "load_smollm2", lambda *a: pytest.fail("loaded the model before checking"))
    code, err = run("--calibration-positions", "0")
    assert code.code == 2 and "--calibration-positions" in err
    code, err = run("--windows", "0")
    assert code.code == 2 and "--windows" in err
    with pytest.raises(ValueError, match="exists for ratios"):  # a saved split without this ratio
        run("--ratios", "3")


@pytest.mark.slow
def test_cpu_memory_floor_builds_and_reports_every_variant(tmp_path):
    """docs/cpu-performance.md's memory-floor numbers come from this program: it must still build and run."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++")
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or "avx512f" not in cpuinfo.read_text(errors="ignore"):
        pytest.skip("needs an AVX-512 CPU on Linux (the program uses AVX-512 intrinsics)")
    exe = tmp_path / "cpu_memory_floor"
    subprocess.run([cxx, "-O2", "-Wall", "-Wextra", "-Werror", "-march=native", "-fopenmp",
                    str(RESEARCH / "cpu_memory_floor.cpp"), "-o", str(exe)], check=True)
    bad = subprocess.run([str(exe), "1000"], capture_output=True, text=True)
    assert bad.returncode == 2 and "multiple of 2048" in bad.stderr
    bad_d = subprocess.run([str(exe), "2048", "40"], capture_output=True, text=True)
    assert bad_d.returncode == 2 and "multiple of 16" in bad_d.stderr
    for d in ("128", "64"):
        out = subprocess.run([str(exe), "2048", d], capture_output=True, text=True, check=True,
                             env={"OMP_NUM_THREADS": "2"}).stdout.splitlines()
        assert out[0].startswith(f"S = 2048, k = 128, 32 heads, D = {d},")
        rates = [float(line.split()[-2]) for line in out[1:]]
        assert len(rates) == 8 and all(r > 0 and math.isfinite(r) for r in rates)
        assert any(line.startswith("gather, V staged") for line in out)


def test_int8_rk_sweep_points_spend_the_same_bytes():
    """research/int8_rk_sweep.py's points: a fixed r, k on the ratio's budget, window k/4; every
    point reads what the full copy's even split reads (up to k's rounding)."""
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("int8_rk_sweep", RESEARCH / "int8_rk_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    from sparq_ext.budget import rk_for_ratio, transfer_bytes
    S, D = 4096, 64
    full = transfer_bytes(1, 1, S, D, *rk_for_ratio(8, S, D), dtype=torch.float32)["sparq"]
    for rank in (8, 12, 16, 20, 28):
        r, k, window = module.RankOnBudget(ratio=8.0, rank=rank).resolve(S, D, dtype=torch.float32,
                                                                         key_t_dtype=torch.int8)
        assert r == rank and window == k // 4
        spent = transfer_bytes(1, 1, S, D, r, k, dtype=torch.float32, key_t_dtype=torch.int8)["sparq"]
        assert abs(spent - full) <= D * 4
    # the library's 8-bit split is one of these points
    r, k = rk_for_ratio(8, S, D, dtype=torch.float32, key_t_dtype=torch.int8)
    assert module.RankOnBudget(ratio=8.0, rank=r).resolve(S, D, dtype=torch.float32, key_t_dtype=torch.int8)[:2] == (r, k)
    # an "exact" point is the full copy at its 8-bit twin's r and k (so it reads more bytes)
    exact = module.ExactAtInt8Split(ratio=8.0, rank=r).resolve(S, D, dtype=torch.float32)
    assert exact == module.RankOnBudget(ratio=8.0, rank=r).resolve(S, D, dtype=torch.float32, key_t_dtype=torch.int8)
    assert transfer_bytes(1, 1, S, D, *exact[:2], dtype=torch.float32)["sparq"] > full + D * 4
