"""The latency benchmark (the README's main job) runs end to end on a tiny CPU shape and
writes what it reports; its timing helper flushes before every timed call; the stage profiler
groups by the names it finds; the GPU session script runs its steps in the planned order and,
dry-run here, writes the files a GPU run brings back. No timing asserts."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparq_ext
from sparq_ext.evaluation import timing as common

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SESSION = BENCHMARKS / "gpu_session.sh"
# The GPU session's steps, most valuable first: the build, the tests, the profile, the benchmark,
# and the sanitizer tools last (memcheck before the optional ones).
SESSION_STEPS = ["ninja", "build", "import", "tests", "profile", "bench_eager", "bench_graphs",
                 "bench_paged", "memcheck", "synccheck", "initcheck", "racecheck"]
# What a session brings back (the device tool returns at most 8 files).
SESSION_FILES = {"session.log", "build.log", "pytest.log", "profile.log", "bench.log",
                 "bench_attention_{tag}_eager.json", "bench_attention_{tag}_graphs.json",
                 "sanitizer.log"}

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


def test_time_interleaved_rotates_the_order():
    calls = []
    fns = {name: (lambda i, name=name: calls.append((name, i))) for name in "ABC"}
    medians = common.time_interleaved(fns, torch.device("cpu"), warmup=1, repeats=3,
                                      before=lambda: calls.append(("before", None)))
    assert set(medians) == set("ABC") and all(t >= 0 for t in medians.values())
    timed = [c for c in calls if c[0] != "before"][3:]  # after the warm-up round
    assert timed == [("A", 0), ("B", 0), ("C", 0), ("B", 1), ("C", 1), ("A", 1),
                     ("C", 2), ("A", 2), ("B", 2)]
    assert len(calls) == 2 * 12  # a `before` ahead of every call


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
    assert row["sparq_pct_of_copy"] == pytest.approx(100 * row["sparq_GBps"] / payload["meta"]["copy_GBps"])
    assert row["sdpa_pct_of_copy"] == pytest.approx(100 * row["sdpa_GBps"] / payload["meta"]["copy_GBps"])
    assert (tmp_path / "bench_attention_cpu.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_attention_int8_selection_cache_smoke(tmp_path):
    """--key-t both: the 8-bit selection cache timed interleaved with the full copy, at its 8-bit
    split of the same ratio; --int8-rk same: at the full copy's r and k."""
    bench_attention = load_script("bench_attention")
    args = ["--device", "cpu", "--seq-lens", "1024", "--kv-heads", "8", "--batch", "1",
            "--dtypes", "fp32", "--warmup", "1", "--repeats", "2", "--no-seed", "--threads", "1",
            "--no-plot", "--key-t", "both", "--out", str(tmp_path)]
    (row,) = bench_attention.main(args)
    assert (row["r"], row["k"], row["r_int8"], row["k_int8"]) == (16, 64, 38, 86)  # fp32, D = 128
    assert row["sparq_int8_ms"] > 0
    assert row["speedup_int8_vs_full"] == pytest.approx(row["sparq_ms"] / row["sparq_int8_ms"])
    # the same bytes (up to k's rounding, a K and a V row per KV head): the 8-bit split
    assert abs(row["sparq_int8_bytes"] - row["sparq_bytes"]) <= 8 * 128 * 4
    (same,) = bench_attention.main(args + ["--int8-rk", "same"])
    assert (same["r_int8"], same["k_int8"]) == (16, 64) and same["sparq_int8_bytes"] < same["sparq_bytes"]


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


def test_profile_stages_groups_by_the_names_it_finds():
    profile_stages = load_script("profile_stages")
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    times = profile_stages.kernel_times(lambda: (a @ b).relu(), torch.device("cpu"), iters=3)
    assert times["aten::mm"][1] == 1 and times["aten::relu"][1] == 1  # launches per call
    assert all(us >= 0 for us, _ in times.values())


def test_gpu_session_steps_in_planned_order():
    # Step names are literal lower-case words; comments and the helpers' own calls are skipped, and
    # a step written twice (its dry-run and GPU forms) counts where it first appears.
    calls = re.findall(r"^[^#\n]*?\b(?:run_step|sanitize) ([a-z_]+)\b", SESSION.read_text(), flags=re.M)
    assert list(dict.fromkeys(calls)) == SESSION_STEPS


@pytest.mark.slow
def test_gpu_session_dry_run(tmp_path):
    if not sparq_ext.has_native_kernel("cpu"):
        pytest.skip("the session's import step needs a native kernel; the dry run checks the CPU one")
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SESSION), "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    log = (tmp_path / "session.log").read_text()
    assert done.returncode == 0, log + done.stdout[-3000:] + done.stderr[-3000:]
    assert "DRY RUN" in log
    assert re.findall(r"START (\w+)", log) == SESSION_STEPS
    assert re.findall(r"PASS (\w+)", log) == SESSION_STEPS
    assert {p.name for p in tmp_path.iterdir()} == {name.format(tag="dry") for name in SESSION_FILES}
    for mode in ("eager", "graphs"):
        payload = json.loads((tmp_path / f"bench_attention_dry_{mode}.json").read_text())
        (row,) = payload["rows"]
        assert row["sparq_ms"] > 0 and row["sdpa_ms"] > 0
    assert "tests/test_cuda.py::test_cuda_graph_capture_and_replay" in (tmp_path / "pytest.log").read_text()
    assert "would run:" in (tmp_path / "sanitizer.log").read_text()
    assert "us/call" in (tmp_path / "profile.log").read_text()
    assert "paged / contiguous" in (tmp_path / "bench.log").read_text()


def test_profile_stages_matches_kernels_to_the_documented_estimates(capsys):
    ps = load_script("profile_stages")

    expected = ps.expected_stage_us("NVIDIA H200", dict(ps.STANDARD_SHAPE), 32768)
    assert expected == ps.EXPECTED_US[("H200", 32768)]
    assert ps.expected_stage_us("NVIDIA H200", dict(ps.STANDARD_SHAPE, B=8), 32768) is None
    assert ps.expected_stage_us("NVIDIA A100", dict(ps.STANDARD_SHAPE), 32768) is None
    assert ps.stage_of("void sparq::topk_kernel<1>(sparq::TopkParams)", expected) == "topk"
    assert ps.stage_of("void at::native::elementwise_kernel", expected) is None
    ps.report("t", {"void approx_logits_kernel<bf16>": (4.0, 1.0), "memcpy": (1.0, 1.0)}, 10**6, 100.0,
              expected)
    out = capsys.readouterr().out
    assert "4.5-4.5" in out and "estimated total (docs/cuda-pipeline.md): 17.7-19.7 us" in out


def test_bench_vllm_arguments(monkeypatch):
    """bench_vllm's options, checked without vLLM (the engine run itself is
    tests/vllm_engine's test_bench_vllm_quick)."""
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "HF_HUB_OFFLINE"):  # the script sets them
        monkeypatch.setenv(name, os.environ.get(name, "1"))  # restored after the test
    bench = load_script("bench_vllm")
    args = bench.parse_args(["--contexts", "1024", "--compile"])
    assert args.compile and args.contexts == [1024]
    assert not bench.parse_args([]).compile  # eager unless asked: the recorded tables are eager
    for bad in (["--ratios", "0"], ["--tokens", "0"], ["--contexts", "16", "--tokens", "32"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
