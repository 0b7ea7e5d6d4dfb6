"""Each input format reads into the same columns; detection picks the right reader."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seqrec.data.formats import ColumnSpec, detect_format, factorize, read_log
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
