"""A retrieval config for tests: a real config file with its paths made absolute, narrow and trained 1 epoch."""

from __future__ import annotations

from pathlib import Path

from retrieval.spec import RetrievalConfig, load_retrieval_config, parse_retrieval_config

ROOT = Path(__file__).resolve().parent.parent


def tiny_retrieval_config(config_file: str, name: str, max_feature_dim: int | None = None) -> RetrievalConfig:
    """``configs/<config_file>`` with embedding_dim 16, 1 epoch at batch 1024; ``max_feature_dim`` also caps the
    features' and the history's embeddings."""
    data = load_retrieval_config(ROOT / "configs" / config_file).model_dump(mode="json")
    d = data["data"]
    d["log"] = str(ROOT / d["log"])
    d["items"]["path"] = str(ROOT / d["items"]["path"])
    d["joins"] = [{**j, "path": str(ROOT / j["path"])} for j in d["joins"]]
    if max_feature_dim is not None:
        for f in data["query_features"] + data["candidate_features"]:
            f["embedding_dim"] = min(f["embedding_dim"] or 8, max_feature_dim)
        data["history"]["embedding_dim"] = max_feature_dim
    data["model"]["embedding_dim"] = 16
    data["training"].update(epochs=1, batch_size=1024)
    return parse_retrieval_config(data, name)
