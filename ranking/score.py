"""Score logged requests with an exported model, as a gateway would: one user, a list of candidates.

A request here is one user's impressions on the newest day of the log (C candidates, raw logged values). The
SavedModel is loaded with plain TensorFlow (no project code in the graph); outputs go through the same
``calibrated_outputs`` as replay (down-sampling correction with the rates in the model's metadata, then the fusion
config's post-hoc calibration if any), and candidates are ranked by a fusion profile's score, or by click.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from calibration.outputs import calibrated_outputs
from features.logs import evaluation_labels, raw_inputs, read_log
from features.spec import parse_config
from fusion.config import load_fusion
from ranking.export import latest_version, load_metadata


def score_logged_requests(model_base_path: str | Path, n_requests: int = 3, top_k: int = 5,
                          log: str | None = None, min_candidates: int = 5, fusion: str | Path | None = None,
                          profile: str | None = None, calibration: str | Path | None = None) -> list[dict]:
    """Score the ``n_requests`` largest user lists of the log's newest day; rank by ``fusion``'s ``profile``."""
    version_dir = latest_version(model_base_path)
    meta = load_metadata(version_dir)
    config = parse_config(meta["feature_spec"], f"{version_dir} metadata")
    tasks = [o["task"] for o in meta["outputs"]]
    ranker, cal, by = None, None, f"predicted {'click' if 'click' in tasks else tasks[0]}"
    if fusion is not None:
        fusion_config, cal = load_fusion(fusion, tasks, calibration)
        name = profile or fusion_config.default_profile or next(iter(fusion_config.profiles))
        ranker = fusion_config.profile(name)
        by = f"fused score (profile {name}, fusion {fusion_config.version})"
    fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    df = read_log(config.data, log)
    day = df[df[config.data.time_column] == df[config.data.time_column].max()]
    sizes = day.groupby(config.data.user_column).size()
    users = sizes[sizes >= min_candidates].sort_values(ascending=False).index[:n_requests]
    print(f"model {meta['model_name']} version {meta['version']} ({version_dir}); {len(users)} logged requests "
          f"from {config.data.time_column}={day[config.data.time_column].max()}")
    results = []
    for user in users:
        rows = day[day[config.data.user_column] == user].reset_index(drop=True)
        x = raw_inputs(rows, config.serving_features)
        tensors = {k: tf.constant(v) for k, v in x.items()}
        fn(**tensors)  # warm path for this shape
        t0 = time.perf_counter()
        out = {k: np.asarray(v) for k, v in fn(**tensors).items()}
        out = calibrated_outputs(out, meta["sampling"], cal)
        score = ranker.score(out) if ranker is not None else out["click"] if "click" in out else out[tasks[0]]
        ms = (time.perf_counter() - t0) * 1e3
        labels = evaluation_labels(rows, config)
        order = np.argsort(-score, kind="stable")
        steps = "model, correction, calibration, fusion" if ranker is not None else "model, correction"
        print(f"\nuser {user}: {len(rows)} candidates scored in {ms:.1f} ms ({steps}); top {top_k} by {by}")
        shown = tasks[:7]
        print("  rank  item      " + "  ".join(f"{t[:10]:>10}" for t in shown)
              + ("       fused" if ranker is not None else "") + "   logged click / watch s")
        for r, i in enumerate(order[:top_k], 1):
            item = rows[config.data.item_column].iloc[i]
            vals = "  ".join(f"{out[t][i]:10.3f}" for t in shown) + (f"  {score[i]:10.4g}" if ranker else "")
            watch = labels["watch_time"][i] if "watch_time" in labels else float("nan")
            click = labels["click"][i] if "click" in labels else float("nan")
            print(f"  {r:>4}  {item:<8}  {vals}   {int(click)} / {watch:.1f}")
        results.append({"user": user, "candidates": len(rows), "ms": ms, "order": order.tolist(), "scores": out,
                        "fused": score if ranker is not None else None})
    return results
