"""What a data set yields, in words a model can check: ``DataSpec``.

    kind              one batch is ...                                  fields
    features+labels   (x float32 [b, features], y int64 [b])            features, classes
    tokens            (x int64 [b, T], y int64 [b, T]) = a (T+1)-token   vocab_size
                      window split into inputs [:-1] and targets [1:]

A model declares the kinds it consumes (``Model.consumes``); the registry
compares them at start-up and names both when they do not fit. Data knows
nothing of models: this is the whole contract between the two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FEATURES_LABELS = "features+labels"
TOKENS = "tokens"


@dataclass(frozen=True)
class DataSpec:
    kind: str = FEATURES_LABELS
    features: int = 0
    classes: int = 0
    vocab_size: int = 0

    def describe(self) -> str:
        if self.kind == TOKENS:
            return f"{self.kind} (vocab {self.vocab_size})"
        return f"{self.kind} ({self.features} features, {self.classes} classes)"

    def to_dict(self) -> dict:
        return asdict(self)


def spec_of(manifest: dict) -> DataSpec:
    """The spec of a data set from its manifest (features+labels, or tokens)."""
    if manifest.get("kind") == TOKENS:
        return DataSpec(TOKENS, vocab_size=int(manifest["vocab_size"]))
    return DataSpec(manifest.get("kind", FEATURES_LABELS), int(manifest["features"]), int(manifest["classes"]))
