"""A node's training data: its partition of the federation's dataset (flwr-datasets), or its own files,
as conversational prompt/completion rows for trl (which then masks the prompt out of the loss)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.embedded import resolve_dataset
from fedtune.errors import FedTuneError

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

# datasets' builder for each local file type
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def alpaca_to_conversation(row: dict[str, Any]) -> dict[str, list[dict[str, str]]] | None:
    """Alpaca (instruction, optional input, output) → chat prompt/completion; None if malformed."""
    instruction, output = row.get("instruction"), row.get("output")
    context = row.get("input") or ""
    if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(context, str):
        return None
    if not instruction.strip() or not output.strip():
        return None
    prompt = f"{instruction.strip()}\n\n{context.strip()}" if context.strip() else instruction.strip()
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": output.strip()}],
    }


def to_conversations(dataset: Dataset) -> tuple[Dataset, int]:
    """Format every row; malformed rows are dropped and counted (never silently trained on)."""
    from datasets import Dataset as HFDataset

    rows, skipped = [], 0
    for row in dataset:
        converted = alpaca_to_conversation(row)
        if converted is None:
            skipped += 1
        else:
            rows.append(converted)
    if skipped:
        log.warning("skipped %d malformed rows (need non-empty string instruction and output)", skipped)
    if not rows:
        raise FedTuneError("no usable training rows: every row lacks an instruction or an output")
    return HFDataset.from_list(rows), skipped


def _local_source(path: Path) -> tuple[str, dict[str, Any]]:
    """datasets builder + kwargs for a local file or a folder of same-type files."""
    if path.is_file():
        builder = _LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise FedTuneError(f"unsupported data file type {path.suffix!r}: use .json/.jsonl/.parquet/.csv")
        return builder, {"data_files": str(path)}
    if path.is_dir():
        for suffix, builder in _LOCAL_BUILDERS.items():
            files = sorted(str(p) for p in path.rglob(f"*{suffix}"))
            if files:
                return builder, {"data_files": files}
        raise FedTuneError(f"no .json/.jsonl/.parquet/.csv files in {path}")
    raise FedTuneError(f"data path not found: {path}")


def check_local_data(data_path: str | Path) -> int:
    """A node's own data, checked when its SuperNode starts (not in round 1): every JSON Lines row is a
    JSON object, and at least one row is a usable Alpaca example. Returns the usable-row count of the
    JSON Lines files (0 when only other types were given: those are checked when loaded)."""
    import json

    _builder, kwargs = _local_source(Path(data_path).expanduser())
    files = kwargs["data_files"]
    usable = 0
    for name in [files] if isinstance(files, str) else files:
        if Path(name).suffix.lower() != ".jsonl":
            continue
        before = usable
        with open(name, encoding="utf-8", errors="strict") as handle:
            try:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise FedTuneError(f"{name} line {number}: not JSON ({err.msg})") from None
                    if not isinstance(row, dict):
                        raise FedTuneError(f"{name} line {number}: not a JSON object")
                    usable += alpaca_to_conversation(row) is not None
            except UnicodeDecodeError:
                raise FedTuneError(f"{name}: not UTF-8 text") from None
        if usable == before:
            raise FedTuneError(f"{name}: no usable row (need non-empty string instruction and output)")
    return usable


def load_partition(dataset_name: str, partition_id: int, num_partitions: int) -> Dataset:
    """This node's IID partition of the dataset (a hub id, or a local file/folder), via flwr-datasets."""
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    if not 0 <= partition_id < num_partitions:
        raise FedTuneError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    source = resolve_dataset(dataset_name)
    partitioners = {"train": IidPartitioner(num_partitions=num_partitions)}
    if Path(source).exists():
        builder, kwargs = _local_source(Path(source))
        fds = FederatedDataset(dataset=builder, partitioners=partitioners, **kwargs)
    else:
        fds = FederatedDataset(dataset=source, partitioners=partitioners)
    return fds.load_partition(partition_id, "train")


def load_local(data_path: str) -> Dataset:
    """All rows of a node's own data (no partitioning: the node owns it)."""
    from datasets import load_dataset

    builder, kwargs = _local_source(Path(data_path).expanduser())
    return load_dataset(builder, split="train", **kwargs)


def load_node_dataset(
    dataset_name: str, node_config: dict[str, Any], default_partitions: int
) -> tuple[Dataset, int]:
    """The training set for the node whose Flower node config is `node_config`."""
    data_path = node_config.get("data-path")
    if data_path:
        raw = load_local(str(data_path))
    else:
        if "partition-id" not in node_config:
            raise FedTuneError("node config lacks partition-id (start the SuperNode with --partition-id)")
        raw = load_partition(
            dataset_name,
            int(node_config["partition-id"]),
            int(node_config.get("num-partitions", default_partitions)),
        )
    return to_conversations(raw)
