"""Each input format reads into the same columns; detection picks the right reader."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seqrec.data.formats import FORMATS, ColumnSpec, detect_format, factorize, read_log
from seqrec.errors import InputError


def _ids(log, which):
    codes, ids = (log.users, log.user_ids) if which == "user" else (log.items, log.item_ids)
    return ids[codes].tolist()


def test_pairs_reads_user_item_rows_in_file_order(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("1 10\n1 12\n\n2 10\n2\t11\n")
    log = read_log(path)
    assert log.format == "pairs"
    assert _ids(log, "user") == [1, 1, 2, 2]
    assert _ids(log, "item") == [10, 12, 10, 11]
    assert log.timestamps is None


def test_lines_expands_each_user_line_into_interactions(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("7 1 2 3\n8 3\n9 4 5\n")
    log = read_log(path)
    assert log.format == "lines"
    assert _ids(log, "user") == [7, 7, 7, 8, 9, 9]
    assert _ids(log, "item") == [1, 2, 3, 3, 4, 5]


def test_movielens_udata_and_ratings_dat_keep_timestamps(tmp_path):
    udata = tmp_path / "u.data"
    udata.write_text("1\t5\t3\t300\n1\t6\t4\t100\n")
    ratings = tmp_path / "ratings.dat"
    ratings.write_text("1::5::3::300\n1::6::4::100\n")
    for path in (udata, ratings):
        log = read_log(path)
        assert log.format == "movielens"
        assert _ids(log, "item") == [5, 6]
        assert log.timestamps.tolist() == [300, 100]


def test_csv_with_string_ids_and_named_columns(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("who,what,when,extra\nalice,B00X,5,z\nbob,12,3,z\nalice,12,7,z\n")
    log = read_log(path, columns=ColumnSpec(user="who", item="what", time="when"))
    assert _ids(log, "user") == ["alice", "bob", "alice"]
    assert _ids(log, "item") == ["B00X", "12", "12"]
    assert log.timestamps.tolist() == [5, 3, 7]
    assert log.item_ids.tolist() == ["12", "B00X"]  # codes follow sorted ids


def test_tsv_and_parquet_use_common_column_names(tmp_path):
    tsv = tmp_path / "log.tsv"
    tsv.write_text("user_id\titem_id\ttimestamp\nu1\ti1\t2\nu1\ti2\t1\n")
    parquet = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": [3, 3], "item_id": [9, 8], "timestamp": [2.5, 1.5]}), parquet)
    assert _ids(read_log(tsv), "item") == ["i1", "i2"]
    log = read_log(parquet)
    assert log.format == "parquet"
    assert _ids(log, "item") == [9, 8]
    assert log.timestamps.tolist() == [2.5, 1.5]


def test_iso_dates_become_unix_seconds(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n1,2,2020-01-01T00:00:10\n")
    assert read_log(path).timestamps.tolist() == [1577836810]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("a.txt", "1 2\n1 3\n", "pairs"),
        ("a.txt", "1 2 3\n2 3\n", "lines"),
        ("u.data", "1\t2\t3\t4\n", "movielens"),
        ("x.dat", "1::2::3::4\n", "movielens"),
        ("a.txt", "user,item\n1,2\n", "csv"),
        ("a.txt", "user\titem\nx\ty\n", "tsv"),
    ],
)
def test_format_detection(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    assert detect_format(path) == expected


def test_ambiguous_integer_rows_ask_for_format(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("1 2 3\n4 5 6\n")
    with pytest.raises(InputError, match="pass --format"):
        detect_format(path)


def test_factorize_dense_and_sparse_integer_ids_agree_with_unique():
    rng = np.random.default_rng(0)
    for values in (rng.integers(1, 50, 1000), rng.integers(0, 10**15, 1000), np.array([-5, 3, -5])):
        codes, ids = factorize(values)
        uniques, inverse = np.unique(values, return_inverse=True)
        assert ids.tolist() == uniques.tolist()
        assert codes.tolist() == inverse.tolist()


def _write_compressed(path, data: bytes, suffix: str):
    import bz2
    import gzip
    import lzma
    import zipfile

    target = path.with_name(path.name + suffix)
    if suffix == ".gz":
        target.write_bytes(gzip.compress(data))
    elif suffix == ".bz2":
        target.write_bytes(bz2.compress(data))
    elif suffix == ".xz":
        target.write_bytes(lzma.compress(data))
    elif suffix == ".zip":
        target = path.with_suffix(".zip")
        with zipfile.ZipFile(target, "w") as archive:
            archive.writestr("release/", "")  # folders and hidden files do not count as members
            archive.writestr("release/.DS_Store", "x")
            archive.writestr(f"release/{path.name}", data)
    else:
        with pa.output_stream(str(target), compression={".zst": "zstd", ".lz4": "lz4"}[suffix]) as stream:
            stream.write(data)
    return target


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip"])
@pytest.mark.parametrize(("name", "text"), [
    ("log.txt", "1 10\n1 12\n2 10\n2 11\n"),
    ("ratings.csv", "user_id,item_id,timestamp\nalice,B00X,5\nbob,12,3\nalice,12,7\n"),
    ("u.data", "1\t5\t3\t300\n1\t6\t4\t100\n"),
])
def test_compressed_input_reads_like_the_plain_file(tmp_path, suffix, name, text):
    plain = tmp_path / name
    plain.write_text(text)
    packed = _write_compressed(plain, text.encode(), suffix)
    expected, got = read_log(plain), read_log(packed)
    assert got.format == expected.format
    for which in ("user", "item"):
        assert _ids(got, which) == _ids(expected, which)
    assert (got.timestamps is None) == (expected.timestamps is None)
    if expected.timestamps is not None:
        assert got.timestamps.tolist() == expected.timestamps.tolist()


def test_json_lines_take_the_review_fields_and_ignore_nested_ones(tmp_path):
    """Amazon 2014 reviews: fields like `style` change shape between records; only the chosen
    three are converted."""
    import json

    records = [
        {"reviewerID": "A1", "asin": "B01", "overall": 5.0, "unixReviewTime": 300, "style": {"Size:": "L"}, "helpful": [0, 0]},
        {"reviewerID": "A1", "asin": "0618", "unixReviewTime": 100, "style": "plain", "reviewText": "ok"},
        {"reviewerID": "A2", "asin": "B01", "unixReviewTime": 200, "image": ["u1", "u2"]},
    ]
    path = tmp_path / "reviews_Beauty_5.json"
    path.write_text(json.dumps(records[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in records[1:]))
    log = read_log(path)
    assert log.format == "jsonl"
    assert _ids(log, "user") == ["A1", "A1", "A2"]
    assert _ids(log, "item") == ["B01", "0618", "B01"]  # digit-only asins stay strings
    assert log.timestamps.tolist() == [300, 100, 200]


def test_json_lines_prefer_parent_asin_and_accept_integer_ids_and_iso_times(tmp_path):
    import json

    amazon_2023 = tmp_path / "Beauty.jsonl"
    amazon_2023.write_text("".join(json.dumps(r) + "\n" for r in [
        {"user_id": "U1", "asin": "v1", "parent_asin": "P1", "timestamp": 1_700_000_000_000},
        {"user_id": "U1", "asin": "v2", "parent_asin": "P1", "timestamp": 1_700_000_000_500},
    ]))
    log = read_log(amazon_2023)
    assert _ids(log, "item") == ["P1", "P1"]
    assert log.timestamps.tolist() == [1_700_000_000_000, 1_700_000_000_500]

    events = tmp_path / "events.ndjson"
    events.write_text('{"uid": 3, "iid": 40, "when": "2020-01-02T00:00:00"}\n{"uid": 3, "iid": 41, "when": "2020-01-01"}\n')
    log = read_log(events, columns=ColumnSpec(time="when"))
    assert _ids(log, "user") == [3, 3] and _ids(log, "item") == [40, 41]
    assert log.timestamps[0] > log.timestamps[1]


@pytest.mark.parametrize(("name", "expected"), [
    ("ratings.csv.gz", "shards/amazon"), ("reviews_Beauty_5.json.gz", "shards/reviews_Beauty_5"),
    ("Musical_Instruments.zip", "shards/Musical_Instruments"), ("u.data.xz", "shards/amazon"), ("beauty.txt", "shards/beauty"),
])
def test_default_output_names_the_content_not_the_compression(name, expected, tmp_path):
    from seqrec.cli import default_output

    assert str(default_output(tmp_path / "amazon" / name)) == expected



@pytest.mark.parametrize("fmt", FORMATS)
def test_the_command_line_accepts_every_format(cli, tmp_path, fmt):
    result = cli("prepare", tmp_path / "absent", "--format", fmt, "--out", tmp_path / "out")
    assert result.code == 2 and "absent: file not found" in result.err, result.err


def test_headerless_csv_reads_with_named_columns(tmp_path):
    """Amazon's ratings-only files (`ratings_Beauty.csv`) have no header line."""
    path = tmp_path / "ratings_Beauty.csv"
    path.write_text("A1,0205616461,5.0,1369699200\nA1,B001,3.0,1369600000\nA2,B001,4.0,1369699200\n")
    with pytest.raises(InputError, match="--columns"):
        read_log(path)
    log = read_log(path, columns=ColumnSpec(names=("user", "item", "rating", "timestamp")))
    assert _ids(log, "user") == ["A1", "A1", "A2"]
    assert _ids(log, "item") == ["0205616461", "B001", "B001"]
    assert log.timestamps.tolist() == [1369699200, 1369600000, 1369699200]


def test_prepared_recipe_without_column_names_is_unchanged():
    """Datasets prepared before headerless files were read keep their fingerprint (no rebuild asked)."""
    from pathlib import Path

    from seqrec.data.prepare import PrepareOptions

    assert set(PrepareOptions(Path("log"), Path("out")).recipe()["columns"]) == {"user", "item", "time", "separator"}
    named = PrepareOptions(Path("log"), Path("out"), columns=ColumnSpec(names=("user", "item"))).recipe()
    assert named["columns"]["names"] == ("user", "item")
