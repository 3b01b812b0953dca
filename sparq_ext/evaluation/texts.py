"""Real text for the tests and benchmarks, all from installed packages (no downloads).

* GPL-3: the GNU GPL-3 licence text that numpy ships in its dist-info (``LICENSE.txt``, section
  "GNU GENERAL PUBLIC LICENSE"), followed by the rest of that file (numpy's own BSD licence and
  the licences of bundled libraries) when more tokens are needed (:func:`gpl3_text`).
* Calibration text for the auto split, so that evaluation is never on the calibration text: the
  NVIDIA CUDA end-user licence agreement that the ``nvidia-cuda-runtime`` wheel (a dependency of
  CUDA builds of torch) ships in its dist-info (``License.txt``, ~12K tokens;
  :func:`calibration_text`).
* Long evaluation texts that are neither licence boilerplate nor the calibration text: the Python
  language reference that CPython ships as ``pydoc_data.topics`` (~92K tokens,
  :func:`python_reference_text`) and the docstrings of pure-Python standard-library modules
  (~94K tokens, :func:`stdlib_docstrings_text`). GPL-3 ends before 8K tokens, so 8K contexts use
  these.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

def gpl3_text() -> str:
    """GPL-3 text from numpy's dist-info, then the rest of that licence file."""
    files = importlib.metadata.files("numpy") or []
    for f in files:
        if f.name in ("LICENSE.txt", "LICENSE") and "dist-info" in str(f):
            text = Path(f.locate()).read_text(encoding="utf-8")
            start = text.find("GNU GENERAL PUBLIC LICENSE")
            if start >= 0:
                return text[start:] + "\n\n" + text[:start]
    raise RuntimeError("numpy's LICENSE.txt with the GPL-3 text was not found")


def calibration_text() -> str:
    """The NVIDIA CUDA EULA from an installed ``nvidia-*`` wheel's dist-info (not GPL-3)."""
    for dist in ("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu12", "nvidia-cublas", "nvidia-cublas-cu12"):
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in files:
            if f.name.lower() == "license.txt" and "dist-info" in str(f):
                text = Path(f.locate()).read_text(encoding="utf-8")
                if "End User License Agreement" in text:
                    return text
    raise RuntimeError("no nvidia-* wheel with the CUDA EULA (License.txt) is installed")


def calibration_text_ids(tokenizer, n_tokens: int | None = None):
    """Token ids ``(1, n)`` of :func:`calibration_text`."""
    ids = tokenizer(calibration_text(), return_tensors="pt").input_ids
    return ids if n_tokens is None else ids[:, :n_tokens]


def python_reference_text() -> str:
    """The Python language reference from ``pydoc_data.topics`` (topics in sorted order), each
    paragraph once: topics repeat sections verbatim (``augassign`` is part of ``assignment``),
    which would turn the evaluation into copying from the context."""
    from pydoc_data.topics import topics
    return _join_dropping_seen_paragraphs(topics[name] for name in sorted(topics))


def _join_dropping_seen_paragraphs(documents) -> str:
    """Join ``documents`` with blank lines, dropping each paragraph (40 characters or more) that
    an earlier document already had."""
    seen, parts = set(), []
    for document in documents:
        paragraphs = document.split("\n\n")
        keep = [p for p in paragraphs if len(p.strip()) < 40 or p.strip() not in seen]
        seen.update(p.strip() for p in paragraphs)
        if keep:
            parts.append("\n\n".join(keep))
    return "\n\n".join(parts)


# Pure-Python standard-library modules whose docstrings are long prose. The text follows the
# Python version (93,737 tokens on Python 3.11.7).
DOCSTRING_MODULES = ("argparse", "asyncio.base_events", "asyncio.events", "asyncio.streams", "asyncio.tasks",
                     "calendar", "configparser", "contextlib", "dataclasses", "difflib", "email.message",
                     "enum", "fractions", "ftplib", "functools", "http.client", "http.cookiejar", "imaplib",
                     "inspect", "ipaddress", "logging", "logging.handlers", "mailbox", "multiprocessing.pool",
                     "pathlib", "pickle", "pydoc", "shutil", "smtplib", "socket", "statistics", "subprocess",
                     "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest.case", "unittest.mock",
                     "urllib.parse", "urllib.request", "zipfile")


def stdlib_docstrings_text() -> str:
    """Docstrings of :data:`DOCSTRING_MODULES` and of the classes, methods and functions they
    define (sorted by name), dropping paragraphs an earlier docstring had. Documentation prose like the language
    reference, but written separately from it: a second evaluation text."""
    import importlib
    import inspect
    import warnings

    def members(obj, module_name):
        for name, value in sorted(vars(obj).items()):
            if name.startswith("_") or getattr(value, "__module__", None) != module_name:
                continue
            if inspect.isclass(value) or inspect.isfunction(value):
                yield value
                if inspect.isclass(value):
                    yield from members(value, module_name)

    docs = []
    for module_name in DOCSTRING_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a platform without it (e.g. no _ssl): the text is a little shorter
            continue
        with warnings.catch_warnings():  # typing.io / typing.re warn when their docstrings are read
            warnings.simplefilter("ignore", DeprecationWarning)
            docs += [obj.__doc__ for obj in (module, *members(module, module_name))]
    return _join_dropping_seen_paragraphs(inspect.cleandoc(doc) for doc in docs if isinstance(doc, str) and doc)


EVALUATION_TEXTS = {"gpl3": gpl3_text, "python-reference": python_reference_text,
                    "stdlib-docstrings": stdlib_docstrings_text}


def real_text_ids(tokenizer, n_tokens: int | None = None, text: str = "gpl3"):
    """Token ids ``(1, n)`` of :func:`gpl3_text` (all of it when ``n_tokens`` is None), or of
    another of :data:`EVALUATION_TEXTS` (``text="python-reference"`` or ``"stdlib-docstrings"``)."""
    ids = tokenizer(EVALUATION_TEXTS[text](), return_tensors="pt").input_ids
    if n_tokens is not None:
        if ids.shape[1] < n_tokens:
            raise ValueError(f"the real text has {ids.shape[1]} tokens, {n_tokens} were asked for")
        ids = ids[:, :n_tokens]
    return ids
