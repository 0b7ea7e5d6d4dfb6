"""`seqrec` command line: synth, prepare, inspect, train, export, recommend, evaluate."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from seqrec.errors import SeqrecError, TrainingStopped
from seqrec.stop_signals import STOPPED_EXIT_CODE

log = logging.getLogger("seqrec")

_GENERIC_STEMS = {"u", "ratings", "data", "interactions", "train", "log"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = without_launcher_rank_flag(list(sys.argv[1:] if argv is None else argv))
    if argv[:1] == ["train"]:
        argv = ["train", *config_flags_as_overrides(argv[1:])]
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    from seqrec import progress

    progress.set_quiet(args.quiet)
    try:
        return args.run(args) or 0
    except TrainingStopped as exc:
        print(f"seqrec {args.command}: {exc}", file=sys.stderr)
        return STOPPED_EXIT_CODE
    except SeqrecError as exc:
        print(f"seqrec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seqrec {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read the output stopped (`seqrec recommend ... | head`): not a failure to report.
        # Point stdout at /dev/null, or flushing it at exit raises the same error again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command that a closed pipe ended


_LOCAL_RANK_FLAG = re.compile(r"--local[_-]rank=\d+")


def without_launcher_rank_flag(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher puts `--local_rank=N` right after the script (`launcher/train.py
    --local_rank=0 ...`) or module (`-m seqrec --local_rank=0 evaluate ...`); the rank is read from
    the environment (LOCAL_RANK) instead, so the flag is dropped wherever it stands."""
    return [token for token in argv if not _LOCAL_RANK_FLAG.fullmatch(token)]


# A config field as a flag, `--section.field=value`: how a wandb sweep agent passes its
# parameters (`${args}` in the sweep's command, the default).
_CONFIG_FLAG = re.compile(r"--([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)=(.*)", re.DOTALL)


def config_flags_as_overrides(argv: list[str]) -> list[str]:
    """`--section.field=value` becomes `--set section.field=value`, so a sweep whose parameters
    are named after config fields (`optim.lr`, `loss.mask_prob`) drives `seqrec train` as it is.
    The agent writes values with Python's str(), so `None` means null there."""
    converted = []
    for token in argv:
        flag = _CONFIG_FLAG.fullmatch(token)
        if flag is None:
            converted.append(token)
            continue
        key, value = flag.groups()
        converted += ["--set", f"{key}={'null' if value == 'None' else value}"]
    return converted


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqrec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write the embedded synthetic interaction log (CSV)")
    synth.add_argument("--preset", default="demo", help="tiny, demo, medium or large (default demo)")
    synth.add_argument("--out", type=Path, required=True, help="CSV file to write")
    synth.add_argument("--users", type=int)
    synth.add_argument("--items", type=int)
    synth.add_argument("--groups", type=int)
    synth.add_argument("--mean-length", type=float)
    synth.add_argument("--seed", type=int)
    synth.set_defaults(run=_run_synth)

    prepare = commands.add_parser("prepare", help="turn an interaction log into WebDataset shards and eval data")
    prepare.add_argument("source", type=Path, help="interaction log, optionally compressed (.gz .bz2 .xz .zst .lz4, one-file .zip)")
    prepare.add_argument("--out", type=Path, help="output directory (default shards/<name of the source>)")
    prepare.add_argument("--format", choices=("pairs", "lines", "movielens", "csv", "tsv", "jsonl", "parquet"), help="default: detected")
    prepare.add_argument("--user-col", help="csv/tsv/jsonl/parquet: user column (default: a common name such as user_id)")
    prepare.add_argument("--item-col", help="csv/tsv/jsonl/parquet: item column (default: a common name such as item_id)")
    prepare.add_argument("--time-col", help="csv/tsv/jsonl/parquet: time column (default: timestamp if present, else file order)")
    prepare.add_argument("--sep", help="csv/tsv: one-character separator")
    prepare.add_argument(
        "--columns",
        help="csv/tsv without a header line: its column names, comma-separated, e.g. user_id,item_id,rating,timestamp",
    )
    prepare.add_argument("--titles", type=Path, help="item titles: u.item, movies.dat or 'item_id<TAB>title'")
    prepare.add_argument("--item-map", type=Path, help="'log_id original_id' lines mapping log item ids to the titles file's ids")
    prepare.add_argument("--dedup-consecutive", action="store_true", help="drop an item repeated right after itself")
    prepare.add_argument("--min-user-interactions", type=int, default=1, help="k-core: minimum interactions per user")
    prepare.add_argument("--min-item-interactions", type=int, default=1, help="k-core: minimum interactions per item")
    prepare.add_argument("--short-users", choices=("train", "drop"), default="train", help="users with < 3 items (default train)")
    prepare.add_argument("--shard-size", type=int, default=10_000, help="sequences per shard (default 10000)")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the user order across shards")
    prepare.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    prepare.set_defaults(run=_run_prepare)

    inspect = commands.add_parser("inspect", help="summarise a prepared dataset and show sample sequences")
    inspect.add_argument("dataset", type=Path)
    inspect.add_argument("--samples", type=int, default=3)
    inspect.set_defaults(run=_run_inspect)

    train = commands.add_parser("train", help="train a model from a job config (also: launcher/train.py)")
    train.add_argument("--config", type=Path, help="YAML job config (configs/*.yaml)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field, e.g. train.epochs=3; --train.epochs=3 is the same (a wandb sweep's ${args})")
    train.add_argument("--resume", default="never", metavar="auto|never|DIR",
                       help="auto: continue from the newest complete checkpoint of the run, if any; or a checkpoint directory")
    train.set_defaults(run=_run_train)

    export = commands.add_parser("export", help="write a run's model (or a checkpoint) as a standard Hugging Face directory")
    export.add_argument("run_dir", type=Path)
    export.add_argument("out_dir", type=Path)
    export.add_argument("--checkpoint", metavar="auto|DIR", help="export a DeepSpeed checkpoint instead of the run's final best model")
    export.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    export.set_defaults(run=_run_export)

    recommend = commands.add_parser("recommend", help="top-K items for item histories, from an exported model")
    recommend.add_argument("--model", type=Path, required=True, help="directory written by `seqrec export`, or a finished run's directory (its model/)")
    source = recommend.add_mutually_exclusive_group(required=True)
    source.add_argument("--history", help="original item ids, oldest first, separated by spaces")
    source.add_argument("--input", type=Path, help="one history per line (original ids separated by spaces)")
    source.add_argument("--user", help="an original user id of --dataset: recommend after that user's whole history")
    recommend.add_argument("--dataset", type=Path, help="with --user: the prepared dataset the user comes from")
    recommend.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    recommend.add_argument("--output", type=Path, help="with --input: JSONL file to write (default: stdout)")
    recommend.add_argument("--skip-unknown", action="store_true", help="drop unknown item ids with a warning instead of failing")
    recommend.add_argument("--include-history", action="store_true", help="allow items already in the history")
    recommend.add_argument("--batch-size", type=int, default=256)
    recommend.add_argument("--device", default="cpu")
    recommend.set_defaults(run=_run_recommend)

    evaluate = commands.add_parser("evaluate", help="an exported model's metrics on a prepared dataset, beside popularity")
    evaluate.add_argument("--model", type=Path, required=True, help="directory written by `seqrec export`, or a finished run's directory (its model/)")
    evaluate.add_argument("--dataset", type=Path, required=True, help="the prepared dataset (the model's item catalogue)")
    evaluate.add_argument("--split", choices=("valid", "test"), default="test")
    evaluate.add_argument("--ks", default="1,5,10,20", help="cut-offs of HR@K and NDCG@K, comma-separated (default 1,5,10,20)")
    evaluate.add_argument("--include-history", action="store_true", help="rank items already in the history too")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                          help="as train.precision; training validates in its own (auto: bf16 where native)")
    evaluate.add_argument("--output", type=Path, help="also write the metrics as JSON here")
    evaluate.add_argument("--predictions", type=Path,
                          help="also write each evaluated user's top-K list here as JSONL (original ids: user, target, "
                               "the target's rank, items and scores, best first)")
    evaluate.add_argument("--top-k", type=int, help="length of each --predictions list (default: the largest of --ks)")
    evaluate.set_defaults(run=_run_evaluate)

    for command in (synth, prepare, inspect, train, export, recommend, evaluate):
        command.add_argument("--quiet", action="store_true", help="warnings and errors only, no progress bars")
    return parser


def _run_synth(args: argparse.Namespace) -> None:
    from seqrec.data.synth import generate, preset, write_csv

    config = preset(args.preset, users=args.users, items=args.items, groups=args.groups, mean_length=args.mean_length, seed=args.seed)
    synth_log = generate(config)
    write_csv(synth_log, args.out)
    log.info("wrote %s: %d interactions of %d users on %d items", args.out, len(synth_log), config.users, config.items)


def _run_prepare(args: argparse.Namespace) -> None:
    from seqrec.data.formats import ColumnSpec
    from seqrec.data.prepare import PrepareOptions, prepare
    from seqrec.data.sequences import FilterOptions

    options = PrepareOptions(
        source=args.source,
        out=args.out or default_output(args.source),
        format=args.format,
        columns=ColumnSpec(
            user=args.user_col, item=args.item_col, time=args.time_col, separator=args.sep, names=_column_names(args.columns)
        ),
        titles=args.titles,
        item_map=args.item_map,
        filters=FilterOptions(
            dedup_consecutive=args.dedup_consecutive,
            min_user_interactions=args.min_user_interactions,
            min_item_interactions=args.min_item_interactions,
        ),
        short_users=args.short_users,
        shard_size=args.shard_size,
        seed=args.seed,
        force=args.force,
        show_progress=progress_enabled(),
    )
    result = prepare(options)
    if not result.skipped:
        counts = result.meta["counts"]
        log.info(
            "prepared %s: %d users, %d items, %d interactions, %d training sequences in %d shards (%.1f s)",
            result.out, counts["users"], counts["items"], counts["interactions"],
            counts["train_sequences"], len(result.meta["shards"]), result.meta["seconds"],
        )
        if counts["evaluated_users"] == 0:
            log.warning(
                "%s: no user has at least %d interactions, so there is nothing to validate or test and `seqrec train` "
                "will refuse it", result.out, result.meta["split"]["min_eval_length"],
            )


def progress_enabled() -> bool:
    from seqrec import progress

    return progress.enabled()


def _run_train(args: argparse.Namespace) -> None:
    from seqrec.config import load_config
    from seqrec.train import run

    from seqrec import distributed

    try:
        run(load_config(args.config, args.overrides), resume=args.resume)
    except TrainingStopped:
        distributed.finish()  # every rank stopped at the same step, checkpoint written: an orderly end
        raise
    distributed.finish()


def _run_export(args: argparse.Namespace) -> None:
    from seqrec.export import export

    out = export(args.run_dir, args.out_dir, args.checkpoint, args.force)
    print(f"exported {args.run_dir} to {out}")


def _run_evaluate(args: argparse.Namespace) -> None:
    import json

    from seqrec import distributed
    from seqrec.atomic import atomic_file
    from seqrec.errors import ConfigError
    from seqrec.evaluate import format_table
    from seqrec.export_eval import evaluate_export, write_predictions

    try:
        ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise ConfigError(f"--ks: expected integers >= 1 separated by commas, got {args.ks!r}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k: must be >= 1, got {args.top_k}")
    result = evaluate_export(
        args.model, args.dataset, args.split, args.batch_size, ks, not args.include_history, args.device, args.precision,
        top_k=args.top_k,
    )
    if result.is_main:
        ranks = f", on {result.world_size} ranks" if result.world_size > 1 else ""
        print(f"{args.model} on {args.dataset}, {result.split} split, {result.users} users, full catalogue"
              f"{'' if args.include_history else ', history excluded'}{ranks}:")
        print(format_table({"seqrec": result.model, "popularity": result.popularity}, ks))
        if args.output is not None:
            row = {"model": str(args.model), "dataset": str(args.dataset), "split": result.split, "users": result.users,
                   "exclude_history": not args.include_history, "metrics": result.model, "popularity": result.popularity}
            with atomic_file(args.output) as handle:
                handle.write(json.dumps(row, indent=2) + "\n")
        if args.predictions is not None:
            with atomic_file(args.predictions) as handle:
                write_predictions(result, handle)
            print(f"wrote {result.users} top-{result.output.top_items.shape[1]} lists to {args.predictions}")
    distributed.finish()  # waits for the other ranks, if any


def _run_recommend(args: argparse.Namespace) -> None:
    import contextlib
    import json

    from seqrec import progress
    from seqrec.atomic import atomic_file
    from seqrec.errors import ConfigError, InputError
    from seqrec.recommend import Recommender

    if args.k < 1:
        raise ConfigError(f"-k: must be >= 1, got {args.k}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    recommender = Recommender(args.model, args.device)
    exclude = not args.include_history
    if args.user is not None:
        from seqrec.data.prepared import PreparedDataset

        if args.dataset is None:
            raise ConfigError("--user needs --dataset, the prepared dataset the user comes from")
        args.history = " ".join(PreparedDataset.open(args.dataset).user_history(args.user))
        print(f"user {args.user}: history (oldest first) {args.history}")
    if args.history is not None:
        history = recommender.to_items(args.history.split(), "--history", args.skip_unknown)
        if not history:
            raise InputError("--history", "no known item ids")
        print(f"{'rank':>4}  {'item':<12} {'score':>9}  title")
        for rank, rec in enumerate(recommender.recommend([history], args.k, exclude)[0], start=1):
            print(f"{rank:>4}  {rec.item:<12} {rec.score:9.4f}  {rec.title}")
        return
    try:
        lines = args.input.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(str(args.input), f"cannot be read ({exc})") from exc
    parsed = [(number, line.split()) for number, line in enumerate(lines, start=1)]
    known = {number: recommender.to_items(raw, f"{args.input}:{number}", args.skip_unknown) for number, raw in parsed}
    # Every id was checked above; the lists are scored and written batch by batch, so memory holds
    # one batch of them however long the input.
    with contextlib.nullcontext(sys.stdout) if args.output is None else atomic_file(args.output) as handle:
        bar = progress.bar(total=len(parsed), desc="recommending", unit="history")
        for start in range(0, len(parsed), args.batch_size):
            chunk = parsed[start : start + args.batch_size]
            scorable = [number for number, _ in chunk if known[number]]
            results = dict(zip(scorable, recommender.recommend([known[n] for n in scorable], args.k, exclude))) if scorable else {}
            for number, raw in chunk:
                row = {"line": number, "history": raw, "recommendations": [
                    {"item": r.item, "title": r.title, "score": round(r.score, 6)} for r in results.get(number, [])
                ]}
                if number not in results:
                    row["error"] = "no known item ids"
                handle.write(json.dumps(row) + "\n")
            bar.update(len(chunk))
        bar.close()
    if args.output is not None:
        print(f"wrote {len(parsed)} recommendation lists to {args.output}")


def _column_names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(name.strip() for name in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise SeqrecError(f"--columns {text!r}: expected distinct, non-empty names separated by commas")
    return names


def default_output(source: Path) -> Path:
    from seqrec.data.inputs import compression_of

    stem = (source.with_suffix("") if compression_of(source) else source).stem
    name = source.parent.name if stem in _GENERIC_STEMS and source.parent.name else stem
    return Path("shards") / name


def _run_inspect(args: argparse.Namespace) -> None:
    from seqrec.data.prepared import PreparedDataset
    from seqrec.data.shards import user_index_of
    from seqrec.data.stream import StreamOptions

    dataset = PreparedDataset.open(args.dataset)
    meta, counts = dataset.meta, dataset.meta["counts"]
    print(f"dataset      {dataset.root}  (from {meta['source']['source']['path']}, format {meta['source']['format']})")
    print(f"users        {counts['users']:,}  ({counts['evaluated_users']:,} evaluated, {counts['train_only_users']:,} train-only, {counts['dropped_users']:,} dropped)")
    print(f"items        {counts['items']:,}  ({counts['items_with_title']:,} with titles)")
    print(f"interactions {counts['interactions']:,}  (raw {counts['raw_interactions']:,})")
    lengths = meta["sequence_length"]
    print(f"length       mean {lengths['mean']}, median {lengths['median']}, min {lengths['min']}, max {lengths['max']}")
    print(f"shards       {len(meta['shards'])} x up to {meta['options']['shard_size']:,} sequences, {counts['train_interactions']:,} training interactions")
    original_ids, titles = dataset.items()
    users = dataset.user_ids()
    for number, sample in enumerate(dataset.sequences(StreamOptions(max_len=10**9, shuffle_buffer=0))):
        if number >= args.samples:
            break
        shown = [titles[i - 1] or original_ids[i - 1] for i in sample.items[-5:].tolist()]
        print(f"user {users[user_index_of(sample.key)]:>10} ({len(sample.items)} items) ... " + " -> ".join(shown))
