"""`seqrec prepare` output: layout, meta, shards, idempotence, atomic replacement."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from seqrec.data.prepared import PreparedDataset
from seqrec.data.shards import decode_sequence, user_index_of
from seqrec.errors import ShardError

LOG = "".join(f"{user} {item}\n" for user, n in ((1, 6), (2, 4), (3, 2), (4, 5)) for item in range(10 * user, 10 * user + n))


def _prepare(cli, tmp_path, *extra):
    source = tmp_path / "log.txt"
    if not source.exists():
        source.write_text(LOG)
    return cli("prepare", source, "--out", tmp_path / "out", "--shard-size", "3", *extra)


def test_output_layout_and_meta_counts(cli, tmp_path):
    result = _prepare(cli, tmp_path)
    assert result.code == 0, result.err
    dataset = PreparedDataset.open(tmp_path / "out")
    counts = dataset.meta["counts"]
    assert (counts["users"], counts["items"], counts["interactions"]) == (4, 17, 17)
    assert counts["evaluated_users"] == 3 and counts["train_only_users"] == 1
    assert counts["train_interactions"] == 17 - 2 * 3
    assert [s["sequences"] for s in dataset.meta["shards"]] == [3, 1]
    assert dataset.meta["source"]["source"]["sha256"]
    assert dataset.meta["format_version"] == 1
    assert "leave-one-out" in dataset.meta["split"]["rule"]
    original_ids, _ = dataset.items()
    assert original_ids[:3] == ["10", "11", "12"]
    assert dataset.user_ids() == ["1", "2", "3", "4"]


def test_a_users_whole_history_is_found_for_evaluated_and_train_only_users(cli, tmp_path):
    """What `seqrec recommend --user` recommends after."""
    assert _prepare(cli, tmp_path).code == 0
    dataset = PreparedDataset.open(tmp_path / "out")
    assert dataset.user_history("1") == [str(item) for item in range(10, 16)]
    assert dataset.user_history("3") == ["30", "31"]  # train-only: read from its shard
    with pytest.raises(ShardError, match="unknown user '9'"):
        dataset.user_history("9")
    assert cli("prepare", tmp_path / "log.txt", "--out", tmp_path / "dropped", "--short-users", "drop").code == 0
    with pytest.raises(ShardError, match="user '3' has no sequence here .* short_users=drop"):
        PreparedDataset.open(tmp_path / "dropped").user_history("3")


def test_shards_hold_every_training_sequence_under_its_user_key(cli, tmp_path):
    _prepare(cli, tmp_path)
    dataset = PreparedDataset.open(tmp_path / "out")
    original_ids, _ = dataset.items()
    users = dataset.user_ids()
    seen = {}
    for path in dataset.shard_paths():
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                assert field == "seq.i32"
                items = decode_sequence(tar.extractfile(member).read(), member.name)
                seen[users[user_index_of(key)]] = [int(original_ids[i - 1]) for i in items]
    assert seen == {"1": [10, 11, 12, 13], "2": [20, 21], "3": [30, 31], "4": [40, 41, 42]}


def test_eval_splits_hold_history_and_targets(cli, tmp_path):
    _prepare(cli, tmp_path)
    dataset = PreparedDataset.open(tmp_path / "out")
    original_ids, _ = dataset.items()
    test = dataset.eval_set("test")
    user0 = [int(original_ids[i - 1]) for i in test.history[test.offsets[0] : test.offsets[1]]]
    assert user0 == [10, 11, 12, 13, 14]
    assert int(original_ids[test.targets[0] - 1]) == 15
    assert len(dataset.eval_set("valid")) == 3


def test_rerun_on_unchanged_input_is_a_no_op(cli, tmp_path):
    _prepare(cli, tmp_path)
    meta_before = (tmp_path / "out" / "meta.json").read_text()
    shard = tmp_path / "out" / "train-000000.tar"
    mtime = shard.stat().st_mtime_ns
    result = _prepare(cli, tmp_path)
    assert result.code == 0
    assert shard.stat().st_mtime_ns == mtime
    assert (tmp_path / "out" / "meta.json").read_text() == meta_before


def test_force_rebuilds_byte_identical_shards(cli, tmp_path):
    _prepare(cli, tmp_path)
    before = (tmp_path / "out" / "train-000000.tar").read_bytes()
    assert _prepare(cli, tmp_path, "--force").code == 0
    assert (tmp_path / "out" / "train-000000.tar").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_changed_input_needs_force_and_keeps_the_old_output(cli, tmp_path):
    _prepare(cli, tmp_path)
    meta_before = (tmp_path / "out" / "meta.json").read_text()
    (tmp_path / "log.txt").write_text(LOG + "5 1\n")
    result = _prepare(cli, tmp_path)
    assert result.code == 2 and "--force" in result.err
    assert (tmp_path / "out" / "meta.json").read_text() == meta_before
    assert _prepare(cli, tmp_path, "--force").code == 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["counts"]["users"] == 5


def test_changed_options_need_force(cli, tmp_path):
    _prepare(cli, tmp_path)
    assert _prepare(cli, tmp_path, "--short-users", "drop").code == 2


def test_titles_through_item_map(cli, tmp_path):
    (tmp_path / "log.txt").write_text("1 1\n1 2\n1 3\n")
    (tmp_path / "map.txt").write_text("1 100\n2 200\n3 300\n")
    (tmp_path / "movies.dat").write_text("100::Alpha (1990)::Drama\n300::Gamma: The Sequel (1999)::Comedy\n", encoding="latin-1")
    result = _prepare(cli, tmp_path, "--titles", tmp_path / "movies.dat", "--item-map", tmp_path / "map.txt")
    assert result.code == 0, result.err
    _, titles = PreparedDataset.open(tmp_path / "out").items()
    assert titles == ["Alpha (1990)", "", "Gamma: The Sequel (1999)"]


def test_default_output_is_under_shards(tmp_path):
    from seqrec.cli import default_output

    assert str(default_output(tmp_path / "beauty.txt")) == "shards/beauty"
    assert str(default_output(tmp_path / "ml-100k" / "u.data")) == "shards/ml-100k"


def test_movielens_titles_are_found_beside_plain_and_compressed_ratings(tmp_path):
    from seqrec.data.titles import sibling_titles_file

    for folder, files in {"plain": ["u.data", "u.item"], "both_gz": ["u.data.gz", "u.item.gz"], "gz_data_plain_item": ["u.data.gz", "u.item"], "none": ["u.data"]}.items():
        (tmp_path / folder).mkdir()
        for name in files:
            (tmp_path / folder / name).touch()
    assert sibling_titles_file(tmp_path / "plain" / "u.data") == tmp_path / "plain" / "u.item"
    assert sibling_titles_file(tmp_path / "both_gz" / "u.data.gz") == tmp_path / "both_gz" / "u.item.gz"
    assert sibling_titles_file(tmp_path / "gz_data_plain_item" / "u.data.gz") == tmp_path / "gz_data_plain_item" / "u.item"
    assert sibling_titles_file(tmp_path / "none" / "u.data") is None
    assert sibling_titles_file(tmp_path / "plain" / "ratings.csv") is None


def test_inspect_prints_counts_and_samples(cli, tiny_dataset):
    result = cli("inspect", tiny_dataset, "--samples", "2")
    assert result.code == 0, result.err
    assert "users" in result.out and "items" in result.out
    assert result.out.count("->") >= 2


def test_missing_dataset_is_a_clear_error(cli, tmp_path):
    result = cli("inspect", tmp_path / "nope")
    assert result.code == 2 and "not a prepared dataset" in result.err


def test_eval_histories_never_contain_their_target_position(tiny_dataset):
    dataset = PreparedDataset.open(tiny_dataset)
    valid, test = dataset.eval_set("valid"), dataset.eval_set("test")
    assert np.array_equal(valid.users, test.users)
    assert np.all(np.diff(test.offsets) == np.diff(valid.offsets) + 1)
    last_of_test_history = test.history[test.offsets[1:] - 1]
    assert np.array_equal(last_of_test_history, valid.targets)
