"""How often could a same-day "clicked" list hold a click from the same request? Measured on KuaiRand-Pure.

The log has no request or page id. This counts, on both files (Apr 25 - May 4), the rows that share a user and
``time_ms`` (the only rows that are certainly one request; the history lists already keep them apart), and the
rows whose clicked list holds a click made within W before the row (same user, same day): the rows that could see
a click from their own page if a page spanned W. Run from the project root:
``.venv/bin/python scripts/history_request_boundary.py``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DATA = "../shared/data/kuairand-pure/"
FILES = ("log_standard_pure_20220425_to_20220430.csv", "log_standard_pure_20220501_to_20220504.csv")
WINDOWS_S = (0.001, 1, 10, 60, 300, 1800)


def main() -> None:
    cols = ["user_id", "video_id", "date", "time_ms", "is_click", "play_time_ms", "tab"]
    df = pd.concat([pd.read_csv(DATA + f, usecols=cols) for f in FILES], ignore_index=True)
    df = df.sort_values(["user_id", "date", "time_ms"], kind="stable").reset_index(drop=True)
    n = len(df)
    print(f"rows {n}, users {df.user_id.nunique()}, user-days {df.groupby(['user_id', 'date']).ngroups}")
    size = df.groupby(["user_id", "time_ms"]).video_id.transform("size").to_numpy()
    groups = df[size > 1].groupby(["user_id", "time_ms"])
    dup = int((groups.video_id.nunique() < groups.size()).sum())
    print(f"rows sharing (user, time_ms) with another row: {int((size > 1).sum())} ({(size > 1).mean():.1%}) in "
          f"{groups.ngroups} groups; {dup} groups repeat one video (a duplicated record, mostly tab "
          f"{df[size > 1].tab.mode()[0]}); with a click: {int(groups.is_click.max().sum())}")
    dates = df.groupby(["user_id", "time_ms"]).date.nunique()
    print(f"requests (user, time_ms) whose rows carry two dates: {int((dates > 1).sum())} "
          f"({int(df.set_index(['user_id', 'time_ms']).index.isin(dates[dates > 1].index).sum())} rows)")
    u, d, t = df.user_id.to_numpy(), df.date.to_numpy(), df.time_ms.to_numpy()
    same = (u[1:] == u[:-1]) & (d[1:] == d[:-1])
    gap = np.diff(t)[same]
    print(f"gap to the user's previous row that day (ms): median {np.median(gap):.0f}, "
          f"share 0: {(gap == 0).mean():.2%}, share in (0, 1 s]: {((gap > 0) & (gap <= 1000)).mean():.2%}, "
          f"(0, 60 s]: {((gap > 0) & (gap <= 60000)).mean():.2%}")
    prev_play = df.play_time_ms.to_numpy()[:-1][same]
    close = (gap > 0) & (gap <= 60000)
    print(f"of those within (0, 60 s]: the row starts before the previous row's play time ended in "
          f"{(gap[close] < prev_play[close]).mean():.1%}")
    # rows whose clicked list holds a click of a row strictly earlier (time) within W, same user and day
    clicked = df.is_click.to_numpy() > 0
    key = u.astype(np.int64) * 100_000_000 + d.astype(np.int64)
    hits = {w: 0 for w in WINDOWS_S}
    last_click = np.full(n, -1, np.int64)  # time of the newest click strictly earlier the same user-day
    newest = -1
    for i in range(n):
        if i == 0 or key[i] != key[i - 1]:
            newest, pending, pending_t = -1, False, -1
        # rows at the same time do not see each other: a click enters the list after the block of its time
        if i > 0 and key[i] == key[i - 1] and t[i] != t[i - 1] and pending:
            newest, pending = pending_t, False
        last_click[i] = newest
        if clicked[i]:
            pending, pending_t = True, t[i]
    has = last_click >= 0
    with_list = int(has.sum())
    age = (t - last_click)[has] / 1000.0
    for w in WINDOWS_S:
        hits[w] = int((age <= w).sum())
    print(f"rows with a non-empty clicked list: {with_list} of {n}")
    for w in WINDOWS_S:
        print(f"  newest click in the list made <= {w:g} s before the row: {hits[w]} rows ({hits[w] / n:.2%} of all,"
              f" {hits[w] / max(with_list, 1):.2%} of rows with a list)")


if __name__ == "__main__":
    main()
