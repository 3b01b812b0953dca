"""A calibrated split of SparQ's byte budget (the "auto" split), its files and the saved ones.

A :class:`Split` says, per layer, which ``r`` step 1 uses and how much of the model's budget the
layer reads (its own compression ratio ``rho_l``); ``k`` then follows from the budget at each
length (:func:`sparq_ext.budget.k_on_budget`). The best split moves with the context length, so a
split holds one entry per calibration length and a decode step uses the entry of the calibration
length nearest to its own (on a log scale). :func:`sparq_ext.integrations.transformers.calibrate_split`
makes one; the evidence for the method is in docs/auto-split.md.

Saved splits ship inside the package (``sparq_ext/splits/<name>_r<ratio>.json``) and are loaded
by name: ``Split.load("smollm2-135m", ratio=8)``, or ``enable_sparq(model, ratio=8, split="auto",
split_file="smollm2-135m")``. Any other path to a JSON file written by :meth:`Split.save` works too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from importlib import resources

from .budget import MAX_LAYER_FRACTION, candidate_rs, k_on_budget



@dataclasses.dataclass
class Split:
    """``lengths``: ``{calibration length: {layer: (r, rho_l)}}``; ``ratio``: the model's ratio."""

    ratio: float
    lengths: dict[int, dict[int, tuple[int, float]]]
    meta: dict = dataclasses.field(default_factory=dict)  # model, criterion, timings, ...

    @classmethod
    def uniform(cls, ratio: float, n_layers: int, r: int, length: int = 1) -> "Split":
        """Every layer at ``r`` on the even per-layer budget (``k`` on the budget line)."""
        return cls(float(ratio), {length: {layer: (r, float(ratio)) for layer in range(n_layers)}})

    def at(self, seq_len: int) -> dict[int, tuple[int, float]]:
        """The per-layer ``(r, rho_l)`` of the calibration length nearest to ``seq_len``."""
        return self.lengths[nearest_length(self.lengths, seq_len)]

    def layer_rk(self, layer: int, seq_len: int, head_dim: int) -> tuple[int, int] | None:
        """``(r, k)`` of ``layer`` at ``seq_len``, or ``None`` when the split does not cover it."""
        entry = self.at(seq_len).get(layer)
        if entry is None:
            return None
        r, rho = entry
        return r, k_on_budget(rho, seq_len, head_dim, r)

    def check(self, head_dim: int, n_layers: int | None = None, source: str = "split", *,
              layers: Iterable[int] | None = None) -> None:
        """Raise ``ValueError`` unless every length's entry reads at most the ratio's budget:
        every ``r`` on its layer's budget line, no layer above :data:`MAX_LAYER_FRACTION` of dense
        (unless at the model's ratio), and ``sum_l 1/rho_l <= len(layers)/ratio``.

        The layers that run SparQ: ``n_layers`` (layers ``0 .. n_layers-1``) or their indices
        ``layers`` (a hybrid model's full-attention layers); a split naming any other layer is refused.
        """
        if (n_layers is None) == (layers is None):
            raise ValueError("give n_layers or layers, not both")
        sparq_layers = list(range(n_layers)) if layers is None else sorted(set(layers))
        for length, entry in sorted(self.lengths.items()):
            where = f"{source} (length {length})"
            for layer, (r, rho) in entry.items():
                if layer not in sparq_layers:
                    if layers is None:
                        raise ValueError(f"{where}: layer {layer} out of range (the model has {n_layers})")
                    raise ValueError(f"{where}: layer {layer} does not run SparQ (the layers that do: "
                                     f"{sparq_layers})")
                if not (rho == self.ratio or 1.0 / rho <= MAX_LAYER_FRACTION + 1e-9):
                    raise ValueError(f"{where}: layer {layer} ratio {rho:g} reads more than "
                                     f"{MAX_LAYER_FRACTION:g} of dense attention")
                if r not in candidate_rs(rho, head_dim):
                    raise ValueError(f"{where}: layer {layer} r={r} is not on the budget line of "
                                     f"its ratio {rho:g} (head_dim {head_dim})")
            spent = sum(1.0 / entry[layer][1] if layer in entry else 1.0 / self.ratio for layer in sparq_layers)
            allowed = len(sparq_layers) / self.ratio
            if spent > allowed * (1 + 1e-9):
                raise ValueError(f"{where}: the layers' ratios spend {spent:.4g} layer budgets, more "
                                 f"than ratio {self.ratio:g} allows ({allowed:.4g})")

    # ------------------------------------------------------------------------------- files
    def to_json(self) -> dict:
        payload = {"ratio": self.ratio, "lengths": {
            str(length): {"layer_r": {str(layer): int(r) for layer, (r, _) in sorted(layers.items())},
                          "layer_ratio": {str(layer): float(rho) for layer, (_, rho) in sorted(layers.items())}}
            for length, layers in sorted(self.lengths.items())}}
        payload.update(self.meta)
        return payload

    @classmethod
    def from_json(cls, payload, source: str = "split") -> "Split":
        """Read :meth:`to_json`'s format; a file without ``"lengths"`` holds one entry for every
        length (``"layer_r"``, ``"layer_ratio"`` at the top level, ratio per layer optional)."""
        try:
            ratio = float(payload["ratio"])
            entries = payload.get("lengths") or {str(payload.get("tokens", 1)): payload}
            lengths = {}
            for length, entry in entries.items():
                ratios = {int(a): float(b) for a, b in entry.get("layer_ratio", {}).items()}
                lengths[int(length)] = {int(a): (int(b), ratios.get(int(a), ratio))
                                        for a, b in entry["layer_r"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{source} is not a sparq_ext split file: {error!r}") from error
        if not lengths:
            raise ValueError(f"{source} is not a sparq_ext split file: it holds no split")
        meta = {key: value for key, value in payload.items()
                if key not in ("ratio", "lengths", "layer_r", "layer_ratio")}
        return cls(ratio, lengths, meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write the split as JSON (atomically: a crash never leaves half a file)."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(self.to_json(), f, indent=2)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, ratio: float | None = None) -> "Split":
        """A split by saved name (:func:`saved_splits`; needs ``ratio``) or by file path."""
        text, source = _read(name_or_path, ratio)
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not a sparq_ext split file: {error}") from error
        if not isinstance(payload, dict):
            raise ValueError(f"{source} is not a sparq_ext split file: not a JSON object")
        return cls.from_json(payload, source)


def saved_splits() -> dict[str, list[float]]:
    """The splits shipped with the package: ``{name: [ratios]}``."""
    found: dict[str, list[float]] = {}
    for entry in _splits_dir().iterdir():
        stem, _, ratio = entry.name.removesuffix(".json").rpartition("_r")
        if entry.name.endswith(".json") and stem:
            found.setdefault(stem, []).append(float(ratio))
    return {name: sorted(ratios) for name, ratios in sorted(found.items())}


def _splits_dir():
    return resources.files("sparq_ext") / "splits"


def _read(name_or_path, ratio) -> tuple[str, str]:
    path = os.fspath(name_or_path)
    if os.path.sep in path or path.endswith(".json") or os.path.exists(path):
        if not os.path.isfile(path):
            raise ValueError(f"split_file {path!r}: no such file (saved splits: {sorted(saved_splits())})")
        with open(path) as f:
            return f.read(), path
    saved = saved_splits()
    if path not in saved:
        raise ValueError(f"split_file {path!r} is neither a file nor a saved split "
                         f"(saved splits: {sorted(saved)})")
    if ratio is None or float(ratio) not in saved[path]:
        raise ValueError(f"the saved split {path!r} exists for ratios {[f'{r:g}' for r in saved[path]]}, "
                         f"not {ratio!r}")
    resource = _splits_dir() / f"{path}_r{float(ratio):g}.json"
    return resource.read_text(), f"saved split {path!r} (ratio {float(ratio):g})"


def nearest_length(lengths, seq_len: int) -> int:
    """The calibration length closest to ``seq_len`` on a log scale (ties: the longer one)."""
    return min(lengths, key=lambda length: (abs(math.log2(length) - math.log2(max(seq_len, 1))), -length))
