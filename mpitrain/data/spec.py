"""What a data set yields, in words a model can check: ``DataSpec``.

    kind              one batch is ...                                  fields
    features+labels   (x float32 [b, features], y int64 [b])            features, classes
    graphs            (x float32 [N, features], edges int32 [E, 2],     features (node), edge_features,
                       edge_attr float32 [E, edge_features],            classes
                       node_ptr int64 [b+1], y int64 [b])
                      b graphs packed into one block-diagonal graph of N nodes and E directed edges
                      (sender, receiver), sorted by receiver; graph g owns nodes node_ptr[g]:node_ptr[g+1]
    tokens            (x int64 [b, T], y int64 [b, T]) = a (T+1)-token   vocab_size
                      window split into inputs [:-1] and targets [1:]

A model declares the kinds it consumes (``Model.consumes``); the registry
compares them at start-up and names both when they do not fit. Data knows
nothing of models: this is the whole contract between the two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FEATURES_LABELS = "features+labels"
GRAPHS = "graphs"
TOKENS = "tokens"


@dataclass(frozen=True)
class DataSpec:
    kind: str = FEATURES_LABELS
    features: int = 0          # row features, or node features for graphs
    classes: int = 0
    edge_features: int = 0     # graphs: features per edge (0: none)
    vocab_size: int = 0        # tokens

    def describe(self) -> str:
        if self.kind == GRAPHS:
            return (f"{self.kind} ({self.features} node features, {self.edge_features} edge features, "
                    f"{self.classes} classes)")
        if self.kind == TOKENS:
            return f"{self.kind} (vocab {self.vocab_size})"
        return f"{self.kind} ({self.features} features, {self.classes} classes)"

    def to_dict(self) -> dict:
        return asdict(self)


def spec_of(manifest: dict) -> DataSpec:
    """The spec of a data set from its manifest (``kind`` absent: features+labels)."""
    kind = manifest.get("kind", FEATURES_LABELS)
    if kind == TOKENS:
        return DataSpec(TOKENS, vocab_size=int(manifest["vocab_size"]))
    return DataSpec(kind, int(manifest["features"]), int(manifest["classes"]),
                    int(manifest.get("edge_features", 0)))
