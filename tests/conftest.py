"""Test configuration: the ``backend`` fixtures, the required native backends, and a report of
which backends the run tested (header and summary), so a run that silently fell back to the
pure-torch reference is visible — and fails where ``SPARQ_EXT_REQUIRE_NATIVE`` forbids it."""

from __future__ import annotations

import collections
import importlib.util

import pytest
import torch

import sparq_ext
from sparq_testutil import (BACKENDS, NATIVE_BACKENDS, backend_unavailable, required_native_backends)

# tests/vllm_engine run in vLLM's own venv (`make test-vllm`, part of `make test`); this venv has no vLLM.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_engine"]

_tally: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_item_backend: dict[str, str] = {}


def pytest_configure(config):
    missing = {name: backend_unavailable(name) for name in required_native_backends()}
    missing = {name: why for name, why in missing.items() if why}
    if missing:  # before any test: a run that cannot test a required backend must not pass
        raise pytest.UsageError("SPARQ_EXT_REQUIRE_NATIVE: " + "; ".join(
            f"{name}: {why}" for name, why in sorted(missing.items())) +
            " (set SPARQ_EXT_REQUIRE_NATIVE= to test an intentionally pure-torch install)")


def pytest_report_header(config):
    state = "loaded" if sparq_ext.extension_error is None else f"NOT loaded ({sparq_ext.extension_error})"
    kernels = ", ".join(f"{name}: {'native' if sparq_ext.has_native_kernel(name) else 'reference'}"
                        for name in NATIVE_BACKENDS)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    required = ", ".join(sorted(required_native_backends())) or "none"
    return [f"sparq_ext {sparq_ext.__version__}: extension {state}; kernels {kernels}; CUDA device: {device}; "
            f"required native backends: {required}"]


def _backend_param(request, name):
    why = backend_unavailable(name)
    if why:
        if name in required_native_backends():
            pytest.fail(f"backend {name} is required (SPARQ_EXT_REQUIRE_NATIVE) but {why}")
        pytest.skip(f"backend {name}: {why}")
    return name


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend: the pure-torch reference and each native kernel present."""
    return _backend_param(request, request.param)


@pytest.fixture(params=NATIVE_BACKENDS)
def native_backend(request):
    """Each native kernel (compared against the reference)."""
    return _backend_param(request, request.param)


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(item, "callspec", None)
        params = params.params if params is not None else {}
        name = params.get("backend") or params.get("native_backend")
        if name is None and item.get_closest_marker("cuda") is not None:
            name = "cuda"  # tests/test_cuda.py: CUDA-only tests, counted with the cuda backend
        if name is not None:
            _item_backend[item.nodeid] = name


def pytest_runtest_logreport(report):
    name = _item_backend.get(report.nodeid)
    if name is None:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _tally[name][report.outcome] += 1


def pytest_terminal_summary(terminalreporter):
    if not _tally:
        return
    terminalreporter.section("sparq_ext backends tested")
    for name in BACKENDS:
        counts = _tally.get(name, collections.Counter())
        summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "not run"
        terminalreporter.write_line(f"{name:>9}: {summary}")
