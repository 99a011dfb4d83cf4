"""``vocab.oov_dropout``: in training a fraction of ids is looked up as OOV, so the OOV embedding learns what serving
sends for ids the vocabulary lacks (new users). Trained and exported for real on the synthetic log."""

from __future__ import annotations

import numpy as np
import pytest
import synthetic
from conftest import train_run

from features.logs import raw_inputs
from features.spec import parse_config
from ranking.export import export_run
from ranking.servable import load_servable
from ranking.signatures import SERVING_DEFAULT

UNSEEN = 10**9  # a user id no vocabulary holds


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory, synthetic_log):
    data = synthetic.config(synthetic_log, ["segment", "user_id"], ["click"], epochs=2, batch_size=1024,
                            learning_rate=3e-3).model_dump()
    data["features"][1]["vocab"]["oov_dropout"] = 0.3
    return train_run(parse_config(data, "oov"), tmp_path_factory.mktemp("oov") / "r")


def test_the_oov_row_is_trained_and_serving_never_drops(dropout_run, validation_frame):
    serve = dropout_run.models.serve
    rows = raw_inputs(validation_frame, dropout_run.config.serving_features)
    once = np.asarray(serve(rows, training=False)["click"])
    np.testing.assert_array_equal(np.asarray(serve(rows, training=False)["click"]), once)  # deterministic
    # the OOV row got gradient: with no dropout no training row is OOV (every synthetic user is in the vocabulary)
    # and Adam leaves it at its initial U(-0.05, 0.05) values
    table = np.asarray(serve.get_layer("user_id_embedding").embeddings)
    assert np.abs(table[0]).max() > 0.05
    assert serve.get_layer("user_id_oov_dropout").rate == 0.3


def test_unseen_users_are_served_the_segment_rate(dropout_run, validation_frame, tmp_path):
    """Synthetic users have no effect of their own, so a new user should get the segment's observed click rate
    (over the policy's positions: this model has no bias tower)."""
    sv = load_servable(export_run(dropout_run.run_dir, tmp_path / "models", verbose=False))
    frame = validation_frame.assign(user_id=UNSEEN)
    served = sv.predict(raw_inputs(frame, dropout_run.config.serving_features), signature=SERVING_DEFAULT)["click"]
    for segment, observed in frame.groupby("segment")["click"].mean().items():
        mean = float(np.mean(served[frame["segment"].to_numpy() == segment]))
        assert abs(mean / observed - 1) < 0.1, (segment, mean, observed)
