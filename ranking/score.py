"""Score logged requests with an exported model, as a gateway would: one user, a list of candidates.

A request here is one user's impressions on the newest day of the log (C candidates, raw logged values). The
SavedModel is loaded with plain TensorFlow (no project code in the graph), binary outputs are corrected for
negative down-sampling with the rates shipped in the model's metadata, and candidates are ranked by click.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from calibration.downsampling import correct_downsampling
from features.logs import raw_inputs, read_log, task_labels
from features.spec import parse_config
from ranking.export import latest_version, load_metadata


def score_logged_requests(model_base_path: str | Path, n_requests: int = 3, top_k: int = 5,
                          log: str | None = None, min_candidates: int = 5) -> list[dict]:
    version_dir = latest_version(model_base_path)
    meta = load_metadata(version_dir)
    config = parse_config(meta["feature_spec"], f"{version_dir} metadata")
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
        ms = (time.perf_counter() - t0) * 1e3
        for task in out:
            s = meta["sampling"].get(task, {})
            if s.get("method") == "correct_downsampling":
                out[task] = correct_downsampling(out[task], s["kept_fraction"])
        labels = task_labels(rows, config.tasks)
        order = np.argsort(-out["click"] if "click" in out else -next(iter(out.values())), kind="stable")
        print(f"\nuser {user}: {len(rows)} candidates scored in {ms:.1f} ms; top {top_k} by predicted click")
        shown = [o["task"] for o in meta["outputs"]][:7]
        print("  rank  item      " + "  ".join(f"{t[:10]:>10}" for t in shown) + "   logged click / watch s")
        for r, i in enumerate(order[:top_k], 1):
            item = rows[config.data.item_column].iloc[i]
            vals = "  ".join(f"{out[t][i]:10.3f}" for t in shown)
            watch = labels["watch_time"][i] if "watch_time" in labels else float("nan")
            click = labels["click"][i] if "click" in labels else float("nan")
            print(f"  {r:>4}  {item:<8}  {vals}   {int(click)} / {watch:.1f}")
        results.append({"user": user, "candidates": len(rows), "ms": ms, "order": order.tolist(), "scores": out})
    return results
