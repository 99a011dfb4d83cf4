"""A small real two-tower (MovieLens-100K, 1 epoch) exported as a versioned index: BruteForce top K equals a numpy
dot-product reference, loads and answers in a fresh process that cannot import the project, ScaNN agrees with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fresh_process import serve_in_fresh_process
from tiny_retrieval import tiny_retrieval_config

N_QUERIES = 64


@pytest.fixture(scope="session")
def retrieval_export(tmp_path_factory):
    """-> (run dir, base path, version dir, test queries' raw inputs, data)."""
    from retrieval.data import build_data
    from retrieval.export import export_run
    from retrieval.train import train

    config = tiny_retrieval_config("retrieval_ml100k.yaml", "ml100k tiny", max_feature_dim=16)
    run, _ = train(config, tmp_path_factory.mktemp("runs") / "retrieval", verbose=0)
    base = tmp_path_factory.mktemp("models") / "retrieval"
    version_dir = export_run(run, base, verbose=False)
    built = build_data(config)
    inputs = {k: v[:N_QUERIES] for k, v in built.test.inputs.items()}
    return run, base, version_dir, inputs, built


def _call(fn, inputs):
    import tensorflow as tf

    out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items()}


def test_layout_and_metadata(retrieval_export):
    from ranking.servable import list_versions
    from retrieval.export import METADATA_FILE, read_embeddings

    run, base, version_dir, _, built = retrieval_export
    assert version_dir == base / "1" and list_versions(base) == [1]
    assert sorted(p.name for p in base.iterdir()) == ["1"]  # no temporary directory left behind
    meta = json.loads((version_dir / "assets.extra" / METADATA_FILE).read_text())
    assert meta["indexes"]["scann"]["needs_custom_ops"] == ["Scann"]
    assert meta["indexes"]["brute_force"]["needs_custom_ops"] == []
    assert meta["feature_spec"]["name"] == "retrieval_ml100k"
    assert meta["training_window"]["test_queries"] == 943
    assert set(meta["metrics"]) == {"recall@10", "recall@50", "recall@100", "ndcg@10"}
    assert (version_dir / "scann" / "saved_model.pb").exists()
    ids, emb = read_embeddings(version_dir / "assets.extra" / "item_embeddings.parquet")
    np.testing.assert_array_equal(ids, built.catalog.ids)
    assert emb.shape == (len(ids), 16) and np.isfinite(emb).all()


def test_bruteforce_top_k_equals_numpy_reference(retrieval_export):
    import tensorflow as tf

    from retrieval.export import read_embeddings
    from retrieval.train import embed, load_run

    run, _, version_dir, inputs, _ = retrieval_export
    got = _call(tf.saved_model.load(str(version_dir)).signatures["serving_default"], inputs)
    k = got["item_ids"].shape[1]
    assert k == 100 and got["item_ids"].shape[0] == N_QUERIES

    ids, items = read_embeddings(version_dir / "assets.extra" / "item_embeddings.parquet")
    queries = embed(load_run(run).query_tower, inputs)  # (Q, E)
    scores = queries.astype(np.float64) @ items.astype(np.float64).T  # (Q, I)
    ref = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(got["item_ids"], ids[ref])
    np.testing.assert_allclose(got["scores"], np.take_along_axis(scores, ref, 1), rtol=1e-4, atol=1e-4)


def test_bruteforce_answers_in_fresh_process(retrieval_export, tmp_path):
    import tensorflow as tf

    _, _, version_dir, inputs, _ = retrieval_export
    fresh = serve_in_fresh_process(version_dir, inputs, "serving_default", tmp_path)
    here = _call(tf.saved_model.load(str(version_dir)).signatures["serving_default"], inputs)
    np.testing.assert_array_equal(fresh["item_ids"], here["item_ids"])
    np.testing.assert_allclose(fresh["scores"], here["scores"], rtol=1e-5)


def test_scann_index_agrees_with_bruteforce(retrieval_export):
    import tensorflow as tf
    import tensorflow_recommenders  # noqa: F401  (registers ScaNN's ops)

    _, _, version_dir, inputs, _ = retrieval_export
    exact = _call(tf.saved_model.load(str(version_dir)).signatures["serving_default"], inputs)["item_ids"]
    approx = _call(tf.saved_model.load(str(version_dir / "scann")).signatures["serving_default"], inputs)["item_ids"]
    recall = np.mean([len(np.intersect1d(a, e)) / len(e) for a, e in zip(approx, exact)])
    assert recall >= 0.9, recall


def test_second_export_is_version_two(retrieval_export):
    from ranking.servable import list_versions
    from retrieval.export import export_run

    run, base, _, _, _ = retrieval_export
    assert export_run(run, base, verbose=False) == base / "2"
    assert list_versions(base) == [1, 2]
    with pytest.raises(FileExistsError):
        export_run(run, base, version=2, verbose=False)
