"""The Beam replay (fusion/beam_replay.py) against today's in-process replay on real KuaiRand lists: the same means
for every profile of configs/fusion.yaml, intervals within Monte-Carlo noise, a result that does not depend on how
the lists are partitioned, the same replay.json from the Parquet shards as from the TFRecord shards, and scored
Parquet that tune-fusion and calibrate read instead of rescoring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from example_shards import write_example_shards

from evaluation.bootstrap import interval_from_sums, poisson_weights
from evaluation.lists import key_hash
from features import examples
from features.spec import ConfigError

ROOT = Path(__file__).resolve().parent.parent
FUSION = ROOT / "configs" / "fusion.yaml"
DAYS = [20220428, 20220429, 20220430]
REPS = 1000


@pytest.fixture(scope="module")
def shards(tmp_path_factory, kuairand_model, kuairand_frame) -> Path:
    config, _ = kuairand_model
    return write_example_shards(kuairand_frame, config, tmp_path_factory.mktemp("shards"), DAYS, parts=3,
                                parquet=True)


@pytest.fixture(scope="module")
def in_process(kuairand_model):
    """Today's replay: the log streamed through the model in process (``score_log``), then ``evaluate``."""
    from evaluation.scoring import score_log
    from fusion.replay import evaluate, fusion_for_version, replay_profiles
    from ranking.servable import load_servable

    _, base = kuairand_model
    version_dir, config, cal = fusion_for_version(FUSION, base)
    model = load_servable(version_dir)
    scored = score_log(model, model.config.data.log, days=DAYS, verbose=False)
    return scored, evaluate(scored, replay_profiles(config), calibration=cal, reps=REPS)


@pytest.fixture(scope="module")
def beam_run(tmp_path_factory, kuairand_model, shards):
    """``rankstage replay --examples ... --runner DirectRunner --read-format tfrecord --scored-out ...`` ->
    (replay.json, out, scored dir)."""
    from rankstage.cli import main

    _, base = kuairand_model
    out, scored = tmp_path_factory.mktemp("beam_out"), tmp_path_factory.mktemp("beam_scored")
    argv = ["replay", "--model-base-path", str(base), "--fusion", str(FUSION), "--examples", str(shards),
            "--runner", "DirectRunner", "--read-format", "tfrecord", "--out", str(out), "--scored-out", str(scored),
            "--list-buckets", "16", "--reps", str(REPS)] + [a for d in DAYS for a in ("--day", str(d))]
    assert main(argv) == 0
    return json.loads((out / "replay.json").read_text()), out, scored


def _cells(result: dict):
    for table in ("metrics", "differences"):
        for name, row in result[table].items():
            for metric, cell in row.items():
                yield (table, name, metric), cell


def test_beam_means_equal_the_in_process_replay_for_every_profile(beam_run, in_process):
    got, out, _ = beam_run
    _, want = in_process
    assert got["counts"] == pytest.approx(want["counts"], rel=1e-12)
    assert got["counts"]["lists"] > 1500  # three days of user x day lists of >= 5
    assert set(got["metrics"]) == {"logged_order", "click_only", "watch_only", "hand_set", "engagement_boost"}
    assert got["reference"] == "click_only" and got["days"] == DAYS
    cells = dict(_cells(got))
    assert set(cells) == {key for key, _ in _cells(want)}
    for key, cell in _cells(want):
        assert cells[key]["lists"] == cell["lists"], key
        if np.isfinite(cell["mean"]):
            assert abs(cells[key]["mean"] - cell["mean"]) <= 1e-9, key
    assert (out / "replay.md").read_text().startswith("## replay: model ranker v1")


def test_beam_intervals_agree_with_the_in_process_bootstrap_within_monte_carlo_noise(beam_run, in_process):
    # Poisson(1) weights (Beam) vs multinomial resamples (in process), 1,000 replicates each: a 2.5% / 97.5%
    # quantile of R replicates has a Monte-Carlo standard error of about sqrt(.025 x .975 / R) / phi(1.96) = 0.085
    # bootstrap sd, i.e. 2.2% of the interval's width (3.92 sd), and 3.1% for the difference of two independent
    # runs. Tolerance: 15% of the width (~5 standard errors) for metrics over >= 50 lists (fewer: the quantiles of
    # a handful of lists are too discrete to compare).
    got, _, _ = beam_run
    cells = dict(_cells(got))
    checked = 0
    for key, cell in _cells(in_process[1]):
        if cell["lists"] < 50:
            continue
        (lo, hi), (blo, bhi) = cell["ci95"], cells[key]["ci95"]
        width = hi - lo
        assert abs(blo - lo) <= 0.15 * width and abs(bhi - hi) <= 0.15 * width, (key, cell["ci95"], [blo, bhi])
        checked += 1
    assert checked >= 40  # click, like, long view, watch time, completion of 5 rankings and 4 differences


def test_the_result_does_not_depend_on_how_lists_are_partitioned(beam_run, kuairand_model, shards, tmp_path):
    # the weights are a function of the list key only: 3 buckets, batches of 1,000 records and two passes over
    # disjoint lists (their accumulators merged on the driver) give the same sums
    from fusion.beam_replay import beam_replay
    from fusion.replay import fusion_for_version, replay_profiles

    _, base = kuairand_model
    version_dir, config, cal = fusion_for_version(FUSION, base)
    other = beam_replay(version_dir, str(shards), replay_profiles(config), str(tmp_path), cal, DAYS, reps=REPS,
                        buckets=3, batch_rows=1000, passes=2, read_format="tfrecord")
    cells = dict(_cells(other))
    for key, cell in _cells(beam_run[0]):
        assert cells[key]["lists"] == cell["lists"]
        np.testing.assert_allclose([cells[key]["mean"], *cells[key]["ci95"]], [cell["mean"], *cell["ci95"]],
                                   rtol=1e-12, atol=1e-12, err_msg=str(key))


def test_the_replay_of_the_parquet_shards_is_the_replay_of_the_tfrecord_shards(beam_run, kuairand_model, shards,
                                                                                tmp_path):
    # the default --read-format (auto) reads the Parquet shards beside the TFRecords: the same batches reach the
    # model, so replay.json is the same file, byte for byte (means, counts, intervals, NaN cells)
    from rankstage.cli import main

    _, base = kuairand_model
    _, want, _ = beam_run
    argv = ["replay", "--model-base-path", str(base), "--fusion", str(FUSION), "--examples", str(shards),
            "--runner", "DirectRunner", "--out", str(tmp_path), "--list-buckets", "16", "--reps", str(REPS)] + \
        [a for d in DAYS for a in ("--day", str(d))]
    assert main(argv) == 0
    got = json.loads((tmp_path / "replay.json").read_text())
    assert got["counts"]["lists"] > 1500 and len(dict(_cells(got))) >= 40
    assert (tmp_path / "replay.json").read_text() == (want / "replay.json").read_text()
    assert (tmp_path / "replay.md").read_text() == (want / "replay.md").read_text()


def test_the_parquet_reader_yields_the_tfrecord_readers_batches(shards):
    # batches of 1,000 rows run across the ~5,000-row files, as tf.data's do: every batch equal, column for column
    from fusion.beam_replay import ReadExampleShards, ReadParquetShards, input_shards, list_key_columns, read_schema

    cols, keys = read_schema(str(shards)), list_key_columns("user_day", None)
    readers = []
    for fmt, reader in (("tfrecord", ReadExampleShards), ("parquet", ReadParquetShards)):
        got, files, _ = input_shards(str(shards), DAYS, fmt)
        assert got == fmt and len(files) == 3 * len(DAYS)
        fn = reader(cols, keys, batch_rows=1000)
        fn.setup()
        readers.append(list(fn.process(files)))
    records, parquet = readers
    assert len(records) == len(parquet) > 3 * len(DAYS)
    for i, (want, got) in enumerate(zip(records, parquet, strict=True)):
        assert sorted(got) == sorted(want), i  # the same columns (in another order: the dict is read by name)
        for k, v in want.items():
            assert got[k].dtype == v.dtype, (i, k)
            np.testing.assert_array_equal(got[k], v, err_msg=f"batch {i} {k}")
    first = records[0]
    assert any(v.dtype.kind == "S" for v in first.values())  # string features as fixed-width bytes


def test_missing_or_mismatched_parquet_shards_fail_in_one_line_naming_the_file_and_column(kuairand_model, shards,
                                                                                         tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fusion.beam_replay import beam_replay
    from fusion.replay import fusion_for_version, replay_profiles

    _, base = kuairand_model
    version_dir, config, cal = fusion_for_version(FUSION, base)
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    day = copy / "examples" / f"date={DAYS[1]}"

    def replay(read_format="auto"):
        with pytest.raises(ConfigError) as err:
            beam_replay(version_dir, str(copy), replay_profiles(config), str(tmp_path / "out"), cal, DAYS,
                        reps=10, read_format=read_format)
        assert "\n" not in str(err.value)
        return str(err.value)

    table = pq.read_table(day / "part-00001.parquet")
    name = next(f.name for f in table.schema if f.type == pa.float32())
    pq.write_table(table.set_column(table.schema.get_field_index(name), name, table.column(name).cast(pa.float64())),
                   day / "part-00001.parquet")
    assert replay() == f"{day / 'part-00001.parquet'}: column {name!r} is double, schema.json says float"
    pq.write_table(table.drop_columns([examples.DAY]), day / "part-00001.parquet")
    assert replay() == f"{day / 'part-00001.parquet'}: no column 'key/day' (schema.json has it as int64)"
    (day / "part-00001.parquet").write_bytes(b"not parquet")
    assert replay().startswith(f"{day / 'part-00001.parquet'}: not a readable Parquet file")
    (day / "part-00001.parquet").unlink()
    assert replay().startswith(f"--examples {copy}: {day / 'part-00001.tfrecord.gz'} has no Parquet shard beside it")
    for f in (copy / "examples").glob("*/*.parquet"):
        f.unlink()
    assert replay("parquet").startswith("--read-format parquet: no Parquet shards under")


def test_poisson_weights_are_poisson_one_and_a_function_of_the_key_only():
    h = key_hash([np.arange(4000), np.full(4000, 20220430)])
    w = poisson_weights(h, 500)
    assert w.shape == (4000, 500)
    assert w.mean() == pytest.approx(1.0, abs=0.01) and w.var() == pytest.approx(1.0, abs=0.02)
    assert (w == 0).mean() == pytest.approx(np.exp(-1), abs=0.005)
    np.testing.assert_array_equal(poisson_weights(h[::-1], 500), w[::-1])  # no dependence on order or neighbours
    np.testing.assert_array_equal(poisson_weights(h[:7], 500), w[:7])
    assert abs(np.corrcoef(w[:, 0], w[:, 1])[0, 1]) < 0.05  # replicates independent
    assert key_hash([np.array(["a", "b"])]).tolist() == key_hash([np.array(["a", "b"], dtype=object)]).tolist()
    assert interval_from_sums(np.array([1.0, 2.0]), np.array([0.0, 0.0])) != interval_from_sums(
        np.array([1.0, 2.0]), np.array([1.0, 1.0]))


def test_poisson_weights_by_table_equal_the_search_of_the_cdf():
    # the cell table is a faster searchsorted of the uniforms in the Poisson(1) CDF: the same weights, bit for bit,
    # also for uniforms on each side of every CDF value
    from evaluation import bootstrap as b

    def by_search(x):  # x: 53-bit integers
        return np.searchsorted(b._POISSON1_CDF, x.astype(np.float64) * 2.0 ** -53, side="right").astype(np.float64)

    h = key_hash([np.arange(3000), np.full(3000, 7)])
    with np.errstate(over="ignore"):
        x = b.mix64(b.mix64(h[:, None] ^ (np.arange(1, 201, dtype=np.uint64) * b._GOLDEN)[None, :]) + b._GOLDEN)
    np.testing.assert_array_equal(poisson_weights(h, 200), by_search(x >> np.uint64(11)))
    edges = np.concatenate([b._THRESHOLDS - np.uint64(1), b._THRESHOLDS])
    edges = edges[edges < np.uint64(2 ** 53)]
    cell = edges >> np.uint64(53 - b._CELL_BITS)
    assert b._CELL_SPLIT[cell].all()  # every threshold lies in a split cell, which is searched
    w = b._CELL_WEIGHT[cell]
    w[b._CELL_SPLIT[cell]] = np.searchsorted(b._THRESHOLDS, edges[b._CELL_SPLIT[cell]], side="right")
    np.testing.assert_array_equal(w, by_search(edges))


def test_bootstrap_sums_of_all_cells_equal_weighted_sums_cell_by_cell():
    from evaluation.bootstrap import bootstrap_sums, weighted_sums

    rng = np.random.default_rng(0)
    values = rng.normal(size=(300, 7))
    values[rng.random(values.shape) < 0.3] = np.nan  # lists where a metric is undefined (no positive)
    values[:, 6] = np.nan  # a cell no list defines
    w = poisson_weights(key_hash([np.arange(300)]), 50)
    n, s, rs, rw = bootstrap_sums(values, w)
    for c in range(values.shape[1]):
        want = weighted_sums(values[:, c], w)
        assert n[c] == want[0] and s[c] == pytest.approx(want[1], rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(rs[c], want[2], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(rw[c], want[3])
    assert n[6] == 0 and not rw[6].any()


def test_read_groups_cut_files_by_size_in_order(tmp_path):
    from fusion.beam_replay import read_groups

    files = []
    for i, kb in enumerate([300, 300, 500, 100, 900, 10]):
        f = tmp_path / f"part-{i}"
        f.write_bytes(b"x" * kb * 1024)
        files.append(str(f))
    groups = read_groups(files, read_mb=0.6)
    assert groups == [files[:2], files[2:4], files[4:5], files[5:]]
    assert read_groups(files, read_mb=100) == [files]
    # Parquet shards are grouped as their TFRecord twins are (same batches, same replay.json), whatever their size
    twins = {}
    for f in files:
        Path(f + ".parquet").write_bytes(b"x" * 1024)
        twins[f + ".parquet"] = f
    assert read_groups(list(twins), read_mb=0.6, sized_as=twins) == [[g + ".parquet" for g in x] for x in groups]
    assert read_groups(list(twins), read_mb=0.6) == [list(twins)]


def test_tune_fusion_on_scored_parquet_equals_tune_fusion_rescoring(beam_run, kuairand_model, tmp_path):
    from fusion.tune import tune_fusion

    _, base = kuairand_model
    _, _, scored = beam_run
    common = dict(model_base_path=base, log=None, fusion_path=FUSION, hand_profile=None, tune_days=[20220429],
                  eval_day=20220430, trials=8, seed=0, reps=100)
    a = tune_fusion(out=tmp_path / "rescored", **common)
    b = tune_fusion(out=tmp_path / "parquet", scored_dir=scored, **common)
    assert a["best_trial"] == b["best_trial"] and a["tuned"] == b["tuned"]
    assert (tmp_path / "rescored" / "trials.csv").read_text() == (tmp_path / "parquet" / "trials.csv").read_text()
    for name, m in a["eval"]["metrics"].items():
        for metric, cell in m.items():
            if np.isfinite(cell["mean"]):
                assert b["eval"]["metrics"][name][metric]["mean"] == pytest.approx(cell["mean"], abs=1e-9)


def test_scored_parquet_holds_the_in_process_predictions_and_calibrate_reads_it(beam_run, in_process,
                                                                               kuairand_model, tmp_path):
    from evaluation.scoring import read_scored
    from fusion.calibrate import calibrate_command

    _, _, scored_dir = beam_run
    want, _ = in_process
    got = read_scored(scored_dir, DAYS)
    assert len(got) == len(want)
    np.testing.assert_array_equal(got.user, want.user)
    np.testing.assert_array_equal(got.order, want.order)
    for task, p in want.predictions.items():
        # one float32 ulp on a few rows: the CPU kernels' rounding depends on the batch a row is scored in
        np.testing.assert_allclose(got.predictions[task], p, rtol=1e-6, atol=1e-9, err_msg=task)
        np.testing.assert_array_equal(got.labels[task], want.labels[task])
    _, base = kuairand_model
    a = calibrate_command(base, None, [20220430], None, "platt", None, tmp_path / "a")
    b = calibrate_command(base, None, [20220430], None, "platt", None, tmp_path / "b", scored_dir=scored_dir)
    for task, params in a["artifact"]["tasks"].items():
        for k, v in params.items():
            if isinstance(v, float):
                assert b["artifact"]["tasks"][task][k] == pytest.approx(v, rel=1e-5), (task, k)


def test_scored_parquet_of_another_version_is_refused(beam_run, kuairand_model, tmp_path):
    from fusion.replay import scored_for_version
    from ranking.servable import resolve_version

    _, base = kuairand_model
    _, _, scored_dir = beam_run
    copy = tmp_path / "scored"
    shutil.copytree(scored_dir, copy)
    meta = json.loads((copy / "scored.json").read_text())
    meta["model"]["version"] = 99
    (copy / "scored.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="not by the version being used"):
        scored_for_version(copy, resolve_version(base), DAYS)
