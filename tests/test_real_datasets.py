"""The shared public datasets prepare to their published counts (skip without them; fail under SEQREC_REQUIRE_DATA=1)."""

from __future__ import annotations

import pytest

from seqrec.data.prepared import PreparedDataset
from tests.conftest import require_data


def _prepare(cli, tmp_path, source, *extra) -> PreparedDataset:
    result = cli("prepare", source, "--out", tmp_path / "out", "--quiet", *extra)
    assert result.code == 0, result.err
    return PreparedDataset.open(tmp_path / "out")


def _counts(dataset):
    counts = dataset.meta["counts"]
    return counts["users"], counts["items"], counts["interactions"]


def test_beauty_pairs(cli, tmp_path):
    dataset = _prepare(cli, tmp_path, require_data("beauty.txt"))
    assert dataset.meta["source"]["format"] == "pairs"
    assert _counts(dataset) == (40_226, 54_542, 353_962)
    # Dense 1-based ids in the release map to themselves: published protocols stay comparable.
    original_ids, _ = dataset.items()
    assert original_ids[:3] == ["1", "2", "3"] and original_ids[-1] == "54542"
    assert dataset.meta["counts"]["evaluated_users"] == 40_226


def test_ml1m_pairs_with_titles_through_the_sasrec_id_map(cli, tmp_path):
    source = require_data("ml-1m.txt")
    dataset = _prepare(
        cli, tmp_path, source,
        "--titles", require_data("ml-1m/movies.dat"), "--item-map", require_data("ml-1m/sas_to_original_items.txt"),
    )
    assert _counts(dataset) == (6_040, 3_416, 999_611)
    _, titles = dataset.items()
    assert titles[0] == "Raiders of the Lost Ark (1981)"
    assert dataset.meta["counts"]["items_with_title"] == 3_416


def test_ml100k_movielens_with_sibling_titles(cli, tmp_path):
    dataset = _prepare(cli, tmp_path, require_data("ml-100k/u.data"))
    assert dataset.meta["source"]["format"] == "movielens"
    assert _counts(dataset) == (943, 1_682, 100_000)
    _, titles = dataset.items()
    assert titles[0] == "Toy Story (1995)"
    assert dataset.meta["counts"]["items_with_title"] == 1_682


def test_amazon_musical_instruments_generic_columns_with_string_ids(cli, tmp_path):
    dataset = _prepare(
        cli, tmp_path, require_data("amazon-musical-instruments/ratings.tsv"),
        "--user-col", "user_id", "--item-col", "item_id", "--time-col", "timestamp",
    )
    assert dataset.meta["source"]["format"] == "tsv"
    assert _counts(dataset) == (1_429, 900, 10_261)
    original_ids, _ = dataset.items()
    assert any(not item.isdigit() for item in original_ids)
    assert all(user.startswith("A") for user in dataset.user_ids())


def test_raw_amazon_reviews_zip_prepares_like_its_derived_ratings(cli, tmp_path):
    """The raw 2014 release (a zip of JSON lines: reviewerID, asin, unixReviewTime, nested fields
    that change shape) splits exactly like ratings.tsv, which was derived from it in file order."""
    raw = _prepare(cli, tmp_path / "raw", require_data("amazon-musical-instruments/Musical_Instruments.zip"))
    derived = _prepare(cli, tmp_path / "derived", require_data("amazon-musical-instruments/ratings.tsv"))
    assert raw.meta["source"]["format"] == "jsonl"
    assert raw.meta["counts"] == derived.meta["counts"]
    assert raw.items() == derived.items() and raw.user_ids() == derived.user_ids()
    for split in ("valid", "test"):
        assert (tmp_path / "raw/out" / f"{split}.npz").read_bytes() == (tmp_path / "derived/out" / f"{split}.npz").read_bytes()


@pytest.mark.parametrize(("path", "counts"), [("s3rec/LastFM.txt", (1_090, 3_646, 52_551)), ("s3rec/Toys_and_Games.txt", (19_412, 11_924, 167_597))])
def test_s3rec_lines(cli, tmp_path, path, counts):
    dataset = _prepare(cli, tmp_path, require_data(path))
    assert dataset.meta["source"]["format"] == "lines"
    assert _counts(dataset) == counts


def test_wikipedia_repeats_are_removed_on_request(cli, tmp_path):
    dataset = _prepare(cli, tmp_path, require_data("wikipedia.txt"), "--dedup-consecutive")
    counts = dataset.meta["counts"]
    assert counts["raw_interactions"] == 157_474
    assert counts["removed_consecutive_repeats"] == 124_613
    assert counts["interactions"] == 157_474 - 124_613
    assert counts["train_only_users"] + counts["evaluated_users"] == counts["users"] == 8_227
