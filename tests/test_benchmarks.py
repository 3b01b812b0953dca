"""The latency benchmark (the README's main job) runs end to end on a tiny CPU shape and
writes what it reports; its timing helper flushes before every timed call. No timing asserts."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("tabulate")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def test_time_call_runs_before_each_call_untimed():
    import common

    events = []
    common.time_call(lambda i: events.append(("call", i)), torch.device("cpu"), warmup=2, repeats=3,
                     before=lambda: events.append(("before", None)))
    assert [e[0] for e in events] == ["before", "call"] * 5
    assert [i for kind, i in events if kind == "call"] == [0, 1, 0, 1, 2]


def test_last_level_cache_size_is_plausible():
    import common

    assert 1 << 16 <= common.last_level_cache_bytes() <= 1 << 40


def test_bench_attention_cpu_smoke(tmp_path):
    import bench_attention

    rows = bench_attention.main(["--device", "cpu", "--seq-lens", "1024", "--kv-heads", "8",
                                 "--batch", "1", "--dtypes", "fp32", "--warmup", "1",
                                 "--repeats", "2", "--no-seed", "--threads", "1",
                                 "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "bench_attention_cpu.json").read_text())
    assert payload["meta"]["cache"] == "cold" and payload["meta"]["cache_flush_bytes"] > 0
    assert payload["meta"]["copy_GBps"] > 0 and payload["meta"]["row_gather_GBps"] > 0
    (row,) = payload["rows"]
    assert row == rows[0]
    assert (row["S"], row["Hkv"], row["r"], row["k"]) == (1024, 8, 16, 64)
    assert row["sparq_ms"] > 0 and row["sdpa_ms"] > 0
    assert row["speedup_vs_sdpa"] == pytest.approx(row["sdpa_ms"] / row["sparq_ms"])
    assert (tmp_path / "bench_attention_cpu.png").stat().st_size > 0


def test_split_windows_places_disjoint_windows_and_refuses_too_many():
    pytest.importorskip("transformers")
    import eval_split_windows as sw

    starts = sw.window_starts(total=1000, need=90, windows=10)
    assert len(starts) == 10 and starts[0] == 0 and starts[-1] + 90 <= 1000
    assert all(b - a >= 90 for a, b in zip(starts, starts[1:]))  # disjoint
    assert sw.window_starts(total=100, need=90, windows=1) == [0]
    with pytest.raises(ValueError, match="--windows 12"):
        sw.window_starts(total=1000, need=90, windows=12)


def test_split_windows_summary_pools_losses_and_bootstraps_the_ratio():
    pytest.importorskip("transformers")
    import eval_split_windows as sw

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


def test_split_windows_pools_texts_with_a_bootstrap_stratified_by_text(tmp_path):
    pytest.importorskip("transformers")
    import eval_split_windows as sw

    def cell(n, even, auto, dense0=0.0):
        dense = [dense0 + 0.1 * w for w in range(n)]
        return {"context": 8000, "ratio": 4, "dense_window_nll": dense,
                "window_nll": {"even": [d + math.log(even) for d in dense],
                               "auto_model": [d + math.log(auto) for d in dense]}}

    a, b = cell(4, 1.2, 1.05), cell(2, 1.1, 1.1, dense0=2.0)  # auto gains on text a only
    s = sw.summarise([a, b], torch.Generator().manual_seed(0))
    even = math.exp((4 * math.log(1.2) + 2 * math.log(1.1)) / 6) - 1
    auto = math.exp((4 * math.log(1.05) + 2 * math.log(1.1)) / 6) - 1
    assert s["loss_pct"]["even"] == pytest.approx(100 * even, rel=1e-4)
    assert s["auto_model_over_even"] == pytest.approx(auto / even, rel=1e-3)
    # Every resample keeps 4 windows of a and 2 of b, each text's windows alike: no spread. A
    # bootstrap over the pooled windows (not by text) would draw 6 of a or 6 of b at times.
    lo, hi = s["auto_model_over_even_ci95"]
    assert lo == pytest.approx(auto / even, rel=1e-3) and hi == pytest.approx(auto / even, rel=1e-3)
    # One cell alone, or as a one-element list, bootstraps exactly as before pooling existed.
    assert sw.summarise([a], torch.Generator().manual_seed(1)) == sw.summarise(a, torch.Generator().manual_seed(1))

    def split_file(name, lengths):  # a model-budget split file with per-length entries
        path = tmp_path / name
        path.write_text(json.dumps({"ratio": 4, "layer_r": {"0": 4}, "lengths": {
            str(L): {"layer_r": {"0": r}, "layer_ratio": {"0": 4.0}} for L, r in lengths.items()}}))
        return path

    def write(name, text, split):
        meta = {"text": text, "commit": "abc1234", "split_files": {"model/4": str(split)},
                "split_sha256": {"model/4": sw.file_sha256(split)}, "args": {"tokens": 128}}
        c = dict(a if text == "t1" else b)
        c["summary"] = sw.summarise(c, torch.Generator().manual_seed(0))
        path = tmp_path / name
        path.write_text(json.dumps({"meta": meta, "cells": {"8000/4": c}}))
        return path

    s_old = split_file("old.json", {2048: 8, 8192: 2})
    s_new = split_file("new.json", {1024: 16, 2048: 8, 8192: 2})  # gained a length 8K does not use
    s_other = split_file("other.json", {2048: 8, 8192: 4})  # another split at 8192
    p1, p2 = write("r1.json", "t1", s_old), write("r2.json", "t2", s_new)
    table = sw.pool_runs([p1, p2], tmp_path / "pooled")
    assert "t1 4 + t2 2" in table
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    assert pooled["cells"]["8000/4"]["windows"] == [4, 2]
    assert pooled["cells"]["8000/4"]["summary"]["auto_model_over_even"] == pytest.approx(auto / even, rel=1e-3)
    with pytest.raises(SystemExit, match="other splits"):  # another calibration at 8K: not pooled
        sw.pool_runs([p1, write("r3.json", "t2", s_other)], tmp_path / "bad")
    s_new.write_text("{}")  # the file a run recorded has changed, and there is no git history for it
    with pytest.raises(SystemExit, match="cannot tell"):
        sw.pool_runs([p1, p2], tmp_path / "changed")
    with pytest.raises(SystemExit, match="at least two"):
        sw.pool_runs([p1], tmp_path / "one")


def test_split_windows_recalibration_never_overwrites_the_saved_splits(monkeypatch, capsys, tmp_path):
    pytest.importorskip("transformers")
    import eval_split_windows as sw

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["eval_split_windows.py", *argv])
        with pytest.raises(SystemExit) as exit_info:
            sw.main()
        return exit_info.value.code, capsys.readouterr().err

    code, err = run("--recalibrate")  # --out defaults to benchmarks/results
    assert code == 2 and "overwrite" in err
    code, err = run("--recalibrate", "--out", str(ROOT / "benchmarks" / ".." / "benchmarks" / "results"))
    assert code == 2 and "overwrite" in err
    code, err = run("--calibration-positions", "0")
    assert code == 2 and "--calibration-positions" in err
    # Saved splits from another directory: a missing one is named before the model loads.
    monkeypatch.setattr(sys, "argv", ["eval_split_windows.py", "--split-dir", str(tmp_path), "--ratios", "8",
                                      "--auto", "auto_model", "--out", str(tmp_path)])
    monkeypatch.setattr(sw, "load_smollm2", lambda *a: pytest.fail("loaded the model before checking the splits"))
    with pytest.raises(SystemExit, match="split_smollm2_r8_model.json"):
        sw.main()


def test_accuracy_merge_keeps_a_flat_run_history():
    import eval_accuracy

    def run(commit, history=None):
        return {"commit": commit, **({"earlier_runs": history} if history is not None else {})}

    # As older versions wrote it: every entry carried its own history (the file doubled per merge).
    a = run("a")
    b = run("b", [a])
    c = run("c", [a, b])
    d = run("d", [a, b, c])
    assert [m["commit"] for m in eval_accuracy.run_history(d)] == ["a", "b", "c", "d"]
    assert all("earlier_runs" not in m for m in eval_accuracy.run_history(d))
    # Merging again appends one entry and no nesting: the size grows linearly.
    e = run("e", eval_accuracy.run_history(d))
    assert [m["commit"] for m in eval_accuracy.run_history(e)] == ["a", "b", "c", "d", "e"]
    assert eval_accuracy.run_history(run("first")) == [{"commit": "first"}]


def test_cpu_memory_floor_builds_and_reports_every_variant(tmp_path):
    """The README's memory-floor numbers come from this program: it must still build and run."""
    import shutil
    import subprocess

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++")
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or "avx512f" not in cpuinfo.read_text(errors="ignore"):
        pytest.skip("needs an AVX-512 CPU on Linux (the program uses AVX-512 intrinsics)")
    exe = tmp_path / "cpu_memory_floor"
    subprocess.run([cxx, "-O2", "-Wall", "-Wextra", "-Werror", "-march=native", "-fopenmp",
                    str(ROOT / "benchmarks" / "cpu_memory_floor.cpp"), "-o", str(exe)], check=True)
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
