"""Run tracking: `metrics.jsonl` in the run directory always, and wandb on rank 0.

wandb mode: `online` when the user is logged in (WANDB_API_KEY or a netrc entry), else
`offline` (a local run file, synced later with `wandb sync`); `disabled` on request. An online
start that cannot reach the server within `init_timeout_s` falls back to offline instead of
hanging. Each metrics.jsonl row becomes one wandb history row, flattened (`valid/NDCG@10`,
`sequences_per_s_by_rank/1`) and plotted against the training `step`.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import secrets
import struct
from pathlib import Path

from seqrec.atomic import atomic_file
from seqrec.config import JobConfig
from seqrec.stop_signals import STOPPED_EXIT_CODE

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id"
HISTORY_FILE = "metrics.jsonl"


def read_history(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl rows (training steps, validations, the test), in the order logged."""
    return [json.loads(line) for line in (run_dir / HISTORY_FILE).read_text().splitlines()]


def flatten(row: dict, prefix: str = "") -> dict[str, float | int | str]:
    flat: dict = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            flat.update(flatten({str(index): item for index, item in enumerate(value)}, f"{name}/"))
        else:
            flat[name] = value
    return flat


def wandb_mode(requested: str, environ: dict[str, str] | None = None, netrc_path: Path | None = None) -> str:
    env = os.environ if environ is None else environ
    if requested != "auto":
        return requested
    if env.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY"):
        return "online"
    try:
        path = netrc_path or Path(env.get("NETRC", Path.home() / ".netrc"))
        if path.is_file() and netrc.netrc(str(path)).authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class Tracker:
    """Rank 0 writes; on other ranks every method is a no-op."""

    def __init__(self, config: JobConfig, run_dir: Path, is_main: bool, resumed: bool):
        self.history_path = run_dir / HISTORY_FILE
        self.is_main = is_main
        self.run = None
        self.mode = "disabled"
        if not is_main:
            return
        tracking = config.tracking
        self.mode = wandb_mode(tracking.wandb)
        if self.mode == "disabled":
            return
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else secrets.token_hex(6)
        kwargs = dict(
            project=tracking.project, entity=tracking.entity, name=tracking.run_name or config.name, tags=list(tracking.tags),
            config=config.to_dict(), dir=str(run_dir), id=run_id, resume="allow", reinit="finish_previous",
        )
        try:
            self.run = wandb.init(mode=self.mode, settings=wandb.Settings(init_timeout=tracking.init_timeout_s, console="off", silent=True), **kwargs)
        except Exception as exc:  # noqa: BLE001  (wandb raises many kinds when the server is unreachable)
            if self.mode != "online":
                raise
            log.warning("wandb online start failed (%s); logging offline instead, `wandb sync %s/wandb` uploads later", exc, run_dir)
            self.mode = "offline"
            self.run = wandb.init(mode="offline", settings=wandb.Settings(console="off", silent=True), **kwargs)
        # The run's own id: under a sweep agent wandb takes the agent's (WANDB_RUN_ID) over ours.
        with atomic_file(id_file) as handle:
            handle.write(self.run.id + "\n")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        log.info("wandb %s run %s in %s", self.mode, self.run.id, run_dir / "wandb")

    def reset_history(self, resumed_step: int | None) -> None:
        """Fresh run: empty. Resumed at step S: keep what happened up to the checkpoint (step
        rows <= S; evaluations at S ran after it was saved), so each step appears once."""
        if not self.is_main:
            return
        kept: list[str] = []
        if resumed_step is not None and self.history_path.is_file():
            for line in self.history_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the kill
                    continue
                if row.get("step", 0) < resumed_step or (row.get("step") == resumed_step and "loss" in row):
                    kept.append(line + "\n")
        with atomic_file(self.history_path) as handle:
            handle.write("".join(kept))

    def log(self, row: dict) -> None:
        if not self.is_main:
            return
        with open(self.history_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log(flatten(row))

    def finish(self, metrics: dict, table: dict[str, dict[str, float]]) -> None:
        if self.run is None:
            return
        import wandb

        columns = sorted({name for row in table.values() for name in row})
        self.run.log({"final_metrics": wandb.Table(columns=["model", *columns], data=[[model, *(row.get(c) for c in columns)] for model, row in table.items()])})
        for key, value in flatten({"test": metrics.get("test", {}), "valid": metrics.get("valid", {})}).items():
            self.run.summary[key] = value
        for key, by_rank in metrics.items():
            if key.startswith("peak_") and key.endswith("_by_rank"):
                self.run.summary[key.removesuffix("_by_rank")] = max(by_rank)
        self._close()

    def stopped(self, step: int) -> None:
        """A stop signal ended training at `step`, checkpointed: the wandb run is marked preempted
        and closed; `--resume auto` reopens it (its id is kept in the run directory)."""
        if self.run is None:
            return
        self.run.summary["stopped_at_step"] = step
        self.run.mark_preempting()
        self._close(STOPPED_EXIT_CODE)

    def _close(self, exit_code: int | None = None) -> None:
        """Finish the run and return only once its file is whole. wandb's service buffers the
        run file and writes its last records when it closes the run's stream, which can come
        after `finish` returns (a CI run read a stopped run's file without its last step); a
        job stopped for preemption may be killed right after. Tearing the service down waits
        for it; the next run in this process starts a new one."""
        import wandb

        self.run.finish(exit_code=exit_code)
        self.run = None
        try:
            wandb.teardown()
        except SystemExit as exc:  # wandb exits the process when its service ended badly
            log.warning("wandb's service ended with exit code %s; its run file may lack the last rows (metrics.jsonl has them)", exc.code)


def read_offline_history(run_file: Path) -> list[dict]:
    """History rows of a `.wandb` run file (LevelDB-style log of protobuf records), values decoded
    from JSON, wandb's own `_`-keys dropped. For checks and for reading runs without a server."""
    rows = []
    for record in _offline_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {_item_key(item): json.loads(item.value_json) for item in record.history.item}
            rows.append({key: value for key, value in items.items() if not key.startswith("_")})
    return rows


def read_offline_summary(run_file: Path) -> dict:
    """The run summary a `.wandb` run file ends with (its summary updates merged in order): what a
    sweep reads its metric from. Offline runs write no wandb-summary.json."""
    summary: dict = {}
    for record in _offline_records(run_file):
        if record.WhichOneof("record_type") == "summary":
            summary.update({_item_key(item): json.loads(item.value_json) for item in record.summary.update})
            for item in record.summary.remove:
                summary.pop(_item_key(item), None)
    return {key: value for key, value in summary.items() if not key.startswith("_")}


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _offline_records(run_file: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    block, position, pending, payloads = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            payloads.append(payload)
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            payloads.append(pending + payload)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records
