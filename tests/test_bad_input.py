"""Bad input exits non-zero with the file, line and reason, and leaves no output directory behind."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, mtime=0)


def _zip(members: dict[str, str]) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


_GZIP_LOG = _gzip(b"".join(b"%d %d\n" % (user, item) for user in range(200) for item in range(50)))

CASES = {
    "pairs_malformed_row": ("log.txt", "1 2\n1 3\n1 4 5 6\n", ["--format", "pairs"], [":3:", "malformed row", "expected 2 fields"]),
    "pairs_non_integer_id": ("log.txt", "1 2\n1 3\n1 x7\n", [], [":3:", "item id 'x7' is not an integer"]),
    "lines_non_integer_user": ("log.txt", "1 2 3\n2 4 5\nu3 6 7\n", ["--format", "lines"], [":3:", "user id 'u3' is not an integer"]),
    "lines_user_without_items": ("log.txt", "1 2 3\n\n2\n", ["--format", "lines"], [":3:", "expected at least 2 fields"]),
    "movielens_missing_field": ("u.data", "1\t2\t5\t100\n1\t3\t5\n", [], [":2:", "expected 4 fields"]),
    "movielens_bad_timestamp": ("ratings.dat", "1::2::5::100\n1::3::5::noon\n", [], [":2:", "timestamp id 'noon' is not an integer"]),
    "csv_wrong_field_count": ("log.csv", "user_id,item_id,timestamp\na,b,1\na,c\n", [], [":3:", "malformed row", "expected 3 fields"]),
    "csv_missing_column": ("log.csv", "person,item_id\na,b\n", [], ["missing user column", "--user-col", "person"]),
    "csv_named_column_absent": ("log.csv", "user_id,item_id\na,b\n", ["--time-col", "when"], ["time column 'when' not found"]),
    "csv_empty_value": ("log.csv", "user_id,item_id\na,b\n\n,c\n", [], [":4:", "empty value in column 'user_id'"]),
    "csv_bad_time": ("log.csv", "user_id,item_id,timestamp\na,b,yesterday\n", [], ["time column 'timestamp'", "ISO-8601"]),
    "empty_file": ("log.txt", "", [], ["file is empty"]),
    "only_blank_lines": ("log.txt", "\n\n  \n", [], ["no data lines"]),
    "header_only_csv": ("log.csv", "user_id,item_id\n", [], ["no interactions"]),
    "invalid_utf8": ("log.txt", b"1 2\n1 \xff\n", ["--format", "pairs"], [":2:", "UTF-8"]),
    "gzip_truncated": ("log.txt.gz", _GZIP_LOG[: len(_GZIP_LOG) // 2], ["--format", "pairs"], ["compressed data is truncated or corrupt"]),
    "gzip_not_gzip": ("log.txt.gz", b"1 2\n1 3\n", [], ["compressed data is truncated or corrupt"]),
    "gzip_pairs_bad_row": ("log.txt.gz", _gzip(b"1 2\n1 3\n1 x\n"), [], [":3:", "item id 'x' is not an integer"]),
    "zip_two_files": ("log.zip", _zip({"a.txt": "1 2\n", "b.txt": "1 3\n"}), [], ["exactly one file", "a.txt", "b.txt"]),
    "zip_not_a_zip": ("log.zip", b"1 2\n", [], ["not a readable zip archive"]),
    "jsonl_bad_json": ("log.jsonl", '{"user_id": "a", "item_id": "b"}\n\n{"user_id": "a", item}\n', [], [":3:", "not valid JSON"]),
    "jsonl_not_an_object": ("log.jsonl", '{"user_id": "a", "item_id": "b"}\n["a", "c"]\n', [], [":2:", "one JSON object per line"]),
    "jsonl_missing_field": ("log.jsonl", '{"user_id": "a", "item_id": "b"}\n{"user_id": "a"}\n', [], [":2:", "missing or null 'item_id'"]),
    "jsonl_id_changes_type": ("log.jsonl", '{"user_id": "a", "item_id": "b"}\n{"user_id": "a", "item_id": 7}\n', [], [":2:", "'item_id' is 7"]),
    "jsonl_nested_id": ("log.jsonl", '{"user_id": {"id": 1}, "item_id": "b"}\n', [], [":1:", "'user_id'", "not an id"]),
    "headerless_wrong_field_count": ("log.csv", "a,x,1\na,y\n", ["--columns", "user,item,timestamp"], [":2:", "expected 3 fields like --columns"]),
    "headerless_empty_user": ("log.csv", "a,x,1\n\n,y,2\n", ["--columns", "user,item,timestamp"], [":3:", "'user'"]),
    "columns_for_json_lines": ("log.jsonl", '{"user_id": "a", "item_id": "b"}\n', ["--columns", "u,i"], ["--columns", "csv/tsv without a header"]),
    "jsonl_parquet_inside_gzip": ("log.parquet.gz", _gzip(b"PAR1"), [], ["Parquet", "unpacked"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_names_place_and_reason_and_leaves_nothing(cli, tmp_path, case):
    name, content, extra, expected = CASES[case]
    source = tmp_path / name
    source.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    result = cli("prepare", source, "--out", out, *extra)
    assert result.code == 2
    assert str(source) in result.err
    for fragment in expected:
        assert fragment in result.err, result.err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_missing_file(cli, tmp_path):
    result = cli("prepare", tmp_path / "absent.txt", "--out", tmp_path / "out")
    assert result.code == 2 and "absent.txt: file not found" in result.err
    assert not (tmp_path / "out").exists()


def test_directory_instead_of_file(cli, tmp_path):
    result = cli("prepare", tmp_path, "--out", tmp_path / "out")
    assert result.code == 2 and "not a regular file" in result.err


def test_not_a_parquet_file(cli, tmp_path):
    source = tmp_path / "log.parquet"
    source.write_text("user_id,item_id\n1,2\n")
    result = cli("prepare", source, "--out", tmp_path / "out")
    assert result.code == 2 and "not a readable Parquet file" in result.err
    assert not (tmp_path / "out").exists()


def test_parquet_null_names_the_row(cli, tmp_path):
    source = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": [1, None], "item_id": [2, 3]}), source)
    result = cli("prepare", source, "--out", tmp_path / "out")
    assert result.code == 2 and "row 1: empty value in column 'user_id'" in result.err


def test_bad_titles_file_names_its_line(cli, tmp_path):
    source = tmp_path / "log.txt"
    source.write_text("1 1\n1 2\n")
    titles = tmp_path / "titles.tsv"
    titles.write_text("1\tOne\nno title here\n")
    result = cli("prepare", source, "--out", tmp_path / "out", "--titles", titles)
    assert result.code == 2 and "titles.tsv:2:" in result.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shard-size", "0"], "shard_size must be an integer >= 1"),
        (["--min-user-interactions", "0"], "min_user_interactions must be an integer >= 1"),
        (["--item-map", "m.txt"], "item_map only maps ids for a titles file"),
        (["--columns", "user,,item"], "expected distinct, non-empty names"),
        (["--columns", "user,item,user"], "expected distinct, non-empty names"),
    ],
)
def test_bad_option_values(cli, tmp_path, flags, message):
    source = tmp_path / "log.txt"
    source.write_text("1 1\n")
    result = cli("prepare", source, "--out", tmp_path / "out", *flags)
    assert result.code == 2 and message in result.err


def test_console_script_exits_non_zero_without_traceback(tmp_path):
    source = tmp_path / "log.txt"
    source.write_text("1 2\n1 oops\n")
    run = subprocess.run(
        [sys.executable, "-m", "seqrec", "prepare", str(source), "--out", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert run.returncode == 2
    assert f"{source}:2: item id 'oops' is not an integer" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_closed_output_pipe_ends_quietly(tiny_dataset):
    """`seqrec inspect ... | head`: the reader leaving is no reason for a traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "seqrec", "inspect", str(tiny_dataset), "--samples", "2000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    process.stdout.close()  # before the child has written anything: every write meets a closed pipe
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 141
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
