"""A warm start's embedding tables blended toward its parent's: each table's old rows set to parent + e x (trained -
parent) (new ids' rows kept as trained), for all tables, for user_id alone and for the others, judged on a later
day. Nothing is trained or written; prints one line of figures per blend.

    .venv/bin/python scripts/warm_blend_tables.py --parent reports/chain_seq/seed0/through_20220430 \
        --warm reports/chain_seq_blend25_recenter/seed0/warm_20220501 --day 20220502
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kuairand_days import warm_pair  # noqa: E402  (scripts/ is on sys.path as the script's directory)

SHOWN = [("click", "auc"), ("click", "gauc"), ("like", "auc"), ("long_view", "auc"), ("watch_time", "spearman")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", required=True)
    ap.add_argument("--warm", required=True)
    ap.add_argument("--day", type=int, required=True, help="the judged day (after the warm start's days)")
    ap.add_argument("--blends", type=float, nargs="+", default=[0.5, 0.25, 0.0])
    args = ap.parse_args()

    import keras

    _, warm, before, after, judged = warm_pair(args.parent, args.warm, args.day, "warm_blend_tables")
    tables = [v for layer in warm.models.train.layers if isinstance(layer, keras.layers.Embedding)
              for v in layer.weights]
    users = [v for v in tables if v.path.startswith("user_id")]
    others = [v for v in tables if not v.path.startswith("user_id")]

    def figures() -> str:
        return ", ".join(f"{k} {x:.4f}" for k, x in judged(SHOWN).items())

    def blend(variables: list, e: float) -> None:
        for v in variables:
            w, old = after[v.path].copy(), before[v.path]
            w[:old.shape[0]] = old + e * (w[:old.shape[0]] - old)
            v.assign(w)

    print(f"as trained: {figures()}", flush=True)
    for e in args.blends:
        blend(tables, e)
        print(f"all tables e={e:g}: {figures()}", flush=True)
    blend(tables, 1.0)
    for name, group in (("user_id", users), ("the other tables", others)):
        blend(group, 0.25)
        print(f"{name} e=0.25: {figures()}", flush=True)
        blend(group, 1.0)


if __name__ == "__main__":
    main()
