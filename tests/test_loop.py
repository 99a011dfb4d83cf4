"""``ranking.loop``'s custom step against Keras ``fit``: from the same weights over the same batches, one epoch of
the step (one worker, default strategy) ends where ``compile_model`` + ``fit`` ends, with the position and gate
dropout on and two tasks of unequal loss weight (loss reduction, loss weights, the ``training`` flag, the dropout
draws and Adam all have to agree).
"""

from __future__ import annotations

import keras
import numpy as np
import synthetic
import tensorflow as tf

from features.logs import raw_inputs, read_log, task_labels
from features.spec import parse_config
from features.vocab import build_stats
from ranking import loop
from ranking.fit import compile_model
from ranking.model import build_models
from ranking.sampling import initial_logits, targets

BATCH = 512


def test_one_epoch_of_the_custom_step_equals_keras_fit(tmp_path):
    truth = synthetic.PlantedTruth(position_decay=(0.25, 0.1))
    log = synthetic.write_log(synthetic.generate_log(6000, truth, seed=1), tmp_path / "log.csv")
    data = synthetic.config(log, ["segment"], ["click", "like"], batch_size=BATCH, learning_rate=3e-3,
                            bias_tower=True).model_dump()
    data["tasks"][1]["loss_weight"] = 0.4
    config = parse_config(data, source="test")
    frame = read_log(config.data)
    x = raw_inputs(frame, config.features)
    labels = task_labels(frame, config.tasks)
    stats = build_stats(x, config.features)
    priors = initial_logits(config, labels)
    batches = tf.data.Dataset.from_tensor_slices(
        ({k: tf.constant(v) for k, v in x.items()}, targets(config, labels, np.ones(len(frame)), {}))
    ).batch(BATCH, drop_remainder=True)  # full batches: fit's batch mean is the step's sum / global batch

    keras.utils.set_random_seed(0)
    fitted = build_models(config, stats)
    compile_model(fitted, config, priors)
    fitted.train.fit(batches, epochs=1, verbose=0)

    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    stepped, optimizer = loop.build(config, stats, priors, strategy)
    step = loop.make_train_step(config, stepped, optimizer, strategy, BATCH)
    iterator = iter(batches)
    for _ in range(len(frame) // BATCH):
        step(iterator)

    assert np.ptp(np.asarray(stepped.bias_tower.bias_table())) > 0.01  # the tower did train
    for a, b in zip(fitted.train.weights, stepped.train.weights, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6, err_msg=a.path)
