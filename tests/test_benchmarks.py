"""The latency benchmark (the README's main job) runs end to end on a tiny CPU shape and
writes what it reports; its timing helper flushes before every timed call. No timing asserts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sparq_ext.evaluation import timing as common

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytest.importorskip("tabulate")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def load_script(name):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_call_runs_before_each_call_untimed():
    events = []
    common.time_call(lambda i: events.append(("call", i)), torch.device("cpu"), warmup=2, repeats=3,
                     before=lambda: events.append(("before", None)))
    assert [e[0] for e in events] == ["before", "call"] * 5
    assert [i for kind, i in events if kind == "call"] == [0, 1, 0, 1, 2]


def test_last_level_cache_size_is_plausible():
    assert 1 << 16 <= common.last_level_cache_bytes() <= 1 << 40


@pytest.mark.slow
def test_bench_attention_cpu_smoke(tmp_path):
    bench_attention = load_script("bench_attention")
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


def test_accuracy_merge_keeps_a_flat_run_history():
    pytest.importorskip("transformers")
    eval_accuracy = load_script("eval_accuracy")

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
