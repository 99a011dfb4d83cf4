"""Daily warm start (``ranking.warm_start``, ``rankstage train --warm-start``) on a synthetic log whose last day
brings users never seen before: the child trains on the days after the parent's only, its vocabulary grows with
the old ids' rows unchanged and the new ids' rows trained, an incompatible parent is refused naming the field, and
the exported version names its parent and the days it has seen."""

from __future__ import annotations

import json

import numpy as np
import pytest
import synthetic
from conftest import TRUTH

from features.spec import ConfigError, parse_config
from ranking import warm_start as ws
from ranking.model import build_models
from ranking.runs import load_run
from ranking.train import train

NEW = 100_000  # offset of the last day's new user ids


def _with(config, **data_changes):
    d = config.model_dump()
    d["data"].update(data_changes)
    return parse_config(d, "test")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    log = synthetic.generate_log(16_000, TRUTH, seed=2)
    last = int(log["day"].max())
    moved = (log["day"] == last) & (log["user_id"] % 5 == 0)
    log.loc[moved, "user_id"] += NEW  # ~100 users first seen on the last day
    path = synthetic.write_log(log, root / "log.csv")
    config = synthetic.config(path, ["user_id", "segment"], ["click"], epochs=1, batch_size=512)
    parent = train(_with(config, until=last - 1), root / "parent", verbose=False)  # trains 0..5, validates on 6
    child = train(config, root / "child", verbose=False, warm_start=parent)
    return config, parent, child, last


def test_the_child_trains_on_the_days_after_the_parent_and_records_its_lineage(chain):
    config, parent, child, last = chain
    art = json.loads((child / "artifacts.json").read_text())
    parent_days = json.loads((parent / "artifacts.json").read_text())["train_periods"]
    assert parent_days == list(range(last - 1))  # the parent's validation day was never trained on
    assert art["train_periods"] == [last - 1, last]
    assert art["lineage"]["parent"] == str(parent) and art["lineage"]["days"] == [last - 1, last]
    assert art["lineage"]["days_seen"] == list(range(last + 1))
    assert art["validation_periods"] == []
    # the pipeline wrote examples of the new days only (their statistics still came from every earlier day)
    assert sorted(p.name for p in (child / "features" / "examples").iterdir()) == [f"date={last - 1}", f"date={last}"]


def test_old_rows_are_kept_and_new_ids_get_rows_that_train(chain):
    config, parent, child, _ = chain
    p, c = load_run(parent), load_run(child)
    old, grown = p.stats["user_id"].vocabulary, c.stats["user_id"].vocabulary
    assert grown[:len(old)] == old  # old ids keep their index
    added = grown[len(old):]
    assert len(added) > 50 and all(v >= NEW for v in added)
    oov = config.features[0].vocab.oov_buckets
    before = p.models.train.get_layer("user_id_embedding").embeddings.numpy()
    # the transfer itself: old rows copied exactly, new rows at the mean of the OOV rows
    fresh = build_models(c.config, c.stats)
    grew = ws.transfer_weights(p.models, fresh, c.config)
    assert grew == {"user_id_embedding/embeddings": (len(old) + oov, len(grown) + oov)}
    start = fresh.train.get_layer("user_id_embedding").embeddings.numpy()
    np.testing.assert_array_equal(start[:len(old) + oov], before)
    np.testing.assert_allclose(start[len(old) + oov:], np.repeat(before[:oov].mean(0, keepdims=True), len(added), 0))
    # after training on the new days the new ids' rows have moved away from that start
    after = c.models.train.get_layer("user_id_embedding").embeddings.numpy()
    moved = np.abs(after[len(old) + oov:] - start[len(old) + oov:]).max(axis=1)
    assert (moved > 1e-4).mean() > 0.9, moved


def test_the_child_continues_the_parents_adam_state(chain):
    """The parent's run keeps Adam's moments and step count; the child's optimizer starts from them (a grown
    table's new rows from the OOV rows' mean, like the weights) and its own saved step count continues the
    parent's."""
    import keras

    config, parent, child, _ = chain
    state = ws.parent_optimizer(ws.load_parent(parent))
    assert state is not None and int(state["iterations"]) > 0
    c = load_run(child)
    fresh = build_models(c.config, c.stats)
    ws.transfer_weights(load_run(parent).models, fresh, c.config)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(fresh.train.trainable_variables)
    assert ws.restore_optimizer(optimizer, fresh, state, c.config) == len(fresh.train.trainable_variables)
    assert int(optimizer.iterations.numpy()) == int(state["iterations"])
    oov = config.features[0].vocab.oov_buckets
    for var, m, v in zip(fresh.train.trainable_variables, optimizer._momentums, optimizer._velocities, strict=True):
        for slot, key in ((m, f"m/{var.path}"), (v, f"v/{var.path}")):
            got, old = slot.numpy(), state[key]
            np.testing.assert_array_equal(got[:len(old)], old, err_msg=key)
            if len(got) > len(old):  # the grown user table: new rows at the OOV rows' mean
                assert var.path == "user_id_embedding/embeddings"
                np.testing.assert_allclose(got[len(old):], np.repeat(old[:oov].mean(0, keepdims=True),
                                                                     len(got) - len(old), 0), rtol=1e-6)
    assert np.abs(state["v/user_id_embedding/embeddings"]).max() > 0  # real moments, not a fresh optimizer's zeros
    art = json.loads((child / "artifacts.json").read_text())
    steps = -(-art["rows"]["train"] // config.training.batch_size)
    with np.load(child / "optimizer.npz") as saved:
        assert int(saved["iterations"]) == int(state["iterations"]) + steps


def test_an_embeddings_only_update_leaves_every_other_weight_and_its_adam_moments_as_the_parents(chain, tmp_path):
    """``training.warm_start_update: embeddings``: the dense weights (experts, gates, towers) come out bit for bit
    the parent's, their Adam moments too, while the embedding tables and the logits' biases train; the default
    "all" moves the dense weights."""
    config, parent, child, _ = chain
    d = config.model_dump()
    d["training"]["warm_start_update"] = "embeddings"
    only = train(parse_config(d, "test"), tmp_path / "embeddings_only", verbose=False, warm_start=parent)
    p, e, a = load_run(parent), load_run(only), load_run(child)
    dense = ws.dense_paths(e.models, e.config)
    assert any("mmoe" in path for path in dense) and "click_logit/kernel" in dense
    assert not any("embedding" in path for path in dense) and "click_logit/bias" not in dense  # these train
    before = {v.path: v.numpy() for v in p.models.train.weights}
    for v in e.models.train.trainable_variables:
        if v.path in dense:
            np.testing.assert_array_equal(v.numpy(), before[v.path], err_msg=v.path)
    assert any(np.abs(v.numpy() - before[v.path]).max() > 1e-4 for v in a.models.train.trainable_variables
               if v.path in dense)  # the default update moves them
    table = e.models.train.get_layer("user_id_embedding").embeddings.numpy()
    old = before["user_id_embedding/embeddings"]
    assert np.abs(table[:len(old)] - old).max() > 1e-4
    assert e.models.train.get_layer("click_logit").bias.numpy()[0] != before["click_logit/bias"][0]
    state = ws.parent_optimizer(ws.load_parent(parent))
    with np.load(only / "optimizer.npz") as saved:
        for path in dense:
            np.testing.assert_array_equal(saved[f"m/{path}"], state[f"m/{path}"], err_msg=path)
        assert np.abs(saved["m/user_id_embedding/embeddings"][:len(old)]
                      - state["m/user_id_embedding/embeddings"]).max() > 0


def test_a_blended_update_keeps_the_stated_fraction_of_the_dense_weights_move_and_all_of_the_tables(chain,
                                                                                                   tmp_path):
    """``training.warm_start_blend: 0.25`` (the default, the chain fixture's child): each dense weight ends at
    parent + 0.25 x (the whole update's weight - parent); the embedding tables as the whole update left them."""
    config, parent, child, _ = chain
    assert config.training.warm_start_blend == 0.25
    d = config.model_dump()
    d["training"]["warm_start_blend"] = 1.0
    whole_run = train(parse_config(d, "test"), tmp_path / "whole", verbose=False, warm_start=parent)
    p, b, a = load_run(parent), load_run(child), load_run(whole_run)
    dense = ws.dense_paths(b.models, b.config)
    before = {v.path: v.numpy() for v in p.models.train.weights}
    whole = {v.path: v.numpy() for v in a.models.train.weights}
    moved = 0.0
    for v in b.models.train.weights:
        if v.path in dense:
            np.testing.assert_allclose(v.numpy(), before[v.path] + 0.25 * (whole[v.path] - before[v.path]),
                                       atol=1e-6, err_msg=v.path)
            moved = max(moved, float(np.abs(whole[v.path] - before[v.path]).max()))
        elif not v.path.endswith("_logit/bias"):  # (the biases are recentred after the blend, see below)
            np.testing.assert_allclose(v.numpy(), whole[v.path], atol=1e-6, err_msg=v.path)
    assert moved > 1e-3  # the whole update moved the dense weights, so the blend is seen
    assert b.artifacts["lineage"]["blend"] == 0.25


@pytest.mark.parametrize("run", ["parent", "child"])
def test_logit_biases_are_recentred_on_the_last_day_trained_on(chain, run):
    """``training.recenter_biases`` (default on): after training (the parent: on days 0..5, validated on 6; the
    warm-started child: after its update on the new days) the click logit's bias is shifted so the mean served
    prediction on the last day trained on is that day's click rate; the day and shift are in the artifacts."""
    from features.logs import read_log
    from ranking.judging import judged_predictions
    from ranking.recenter import bias_shift

    config, parent, child, last = chain
    c = load_run(parent if run == "parent" else child)
    day = last - 2 if run == "parent" else last
    assert c.artifacts["recentred"]["day"] == day
    frame = read_log(config.data)
    rows = frame[frame["day"] == day].reset_index(drop=True)
    y, p, _, _ = judged_predictions(c.config, c.models, rows, c.artifacts["sampling"])["click"]
    np.testing.assert_allclose(p.mean(), y.mean(), rtol=1e-4)
    shift = c.artifacts["recentred"]["shifts"]["click"]
    assert abs(shift) > 1e-3  # training alone left the day's mean elsewhere
    bias = c.models.train.get_layer("click_logit").bias
    bias.assign(bias.numpy() - shift)  # undone: the mean is off again
    _, p0, _, _ = judged_predictions(c.config, c.models, rows, c.artifacts["sampling"])["click"]
    assert abs(p0.mean() - y.mean()) > 1e-4
    assert abs(bias_shift(np.array([1.0, 0.0, 0.0, 0.0]), np.full(4, 0.5)) - np.log(1 / 3)) < 1e-9


def test_a_parent_of_another_spec_is_refused_naming_the_difference(chain, tmp_path):
    config, parent, _, _ = chain
    other = config.with_model(expert_units=[32])
    with pytest.raises(ConfigError, match=r"model\.expert_units: parent \[16\], this \[32\]"):
        train(other, tmp_path / "refused", verbose=False, warm_start=parent)
    assert not (tmp_path / "refused" / "model.weights.h5").exists()
    # paths, the window and the training settings may differ
    d = config.model_dump()
    d["training"]["epochs"] = 3
    d["data"]["until"] = 5
    assert ws.spec_difference(config, parse_config(d, "test")) is None


def test_no_new_day_is_a_clear_error(chain, tmp_path):
    config, parent, child, last = chain
    with pytest.raises(ConfigError, match="no day in the window .* after the parent's last day"):
        train(config, tmp_path / "again", verbose=False, warm_start=child)


def test_the_exported_child_names_its_parent_and_the_days_it_has_seen(chain, tmp_path):
    from ranking.export import export_run

    config, parent, child, last = chain
    version = export_run(child, tmp_path / "models", verbose=False)
    assert (version / "assets.extra" / "tf_serving_warmup_requests").stat().st_size > 0
    meta = json.loads((version / "assets.extra" / "rankstage_metadata.json").read_text())
    assert meta["lineage"]["parent"] == str(parent) and meta["lineage"]["days_seen"] == list(range(last + 1))
    assert meta["metrics_from"].startswith("none: a warm start")
    # a version is a parent too: its metadata leads back to the run
    assert ws.resolve_run(version) == child


def test_a_run_directory_trained_again_with_another_config_rebuilds_its_features(chain, tmp_path):
    """``out/features`` resumes a restarted run of the same config; trained again into the same ``--out`` with
    another ``data.until``, the shards are built again (reused, the run validated on the old day)."""
    import shutil

    config, parent, _, last = chain
    out = tmp_path / "again"
    shutil.copytree(parent, out)
    assert (out / "features" / "manifest.json").exists()
    before = json.loads((out / "artifacts.json").read_text())["validation_periods"]
    train(config, out, verbose=False)
    after = json.loads((out / "artifacts.json").read_text())["validation_periods"]
    assert before == [last - 1] and after == [last], (before, after)
    manifest = json.loads((out / "features" / "manifest.json").read_text())
    assert str(last) in manifest["rows_per_day"]
