"""`fedtune-supernode`: start `flower-supernode` for one data partition, over TLS.

The partition is explicit (`--partition-id`) or derived from an ordinal: the trailing `-N` of the pod
or host name (`--partition-from-ordinal`, StatefulSet style) plus `--partition-offset`.
Every flag also reads an environment variable: FEDTUNE_SUPERLINK, FEDTUNE_ROOT_CERTIFICATES,
FEDTUNE_PARTITION_ID, FEDTUNE_PARTITION_FROM_ORDINAL (1/0), FEDTUNE_PARTITION_OFFSET,
FEDTUNE_NUM_PARTITIONS, FEDTUNE_DATA_PATH, FEDTUNE_CLIENTAPP_PORT, FEDTUNE_AUTH_KEY, FEDTUNE_INSECURE,
FEDTUNE_WARM_TRAINER (1/0), FEDTUNE_TRAINER_SOCKET, FEDTUNE_WARM_TRAINER_PRELOAD, FEDTUNE_COMPILE_CACHE_DIR,
FEDTUNE_CLIENTAPP_PRESTART (0 = --cold-clientapp).
With --warm-trainer the SuperNode starts only once its warm trainer answers (supernode/warm_trainer.py).
Each message's ClientApp process is started ahead, while the node waits (fedtune/prestart.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys

from clientapp.warm.protocol import SOCKET_NODE_CONFIG_KEY
from fedtune.certs import check_ca_file
from fedtune.dataset import check_local_data
from fedtune.errors import FedTuneError, one_line_errors
from fedtune.object_waits import object_wait_seconds
from fedtune.preflight import OneLineParser, env_int, env_port, port_arg
from fedtune.runtime_env import env_flag, env_tristate, find_executable, flwr_env, passthrough, require_file
from supernode import warm_trainer
from supernode.flower_entry import PRESTART_ENV
from supernode.warm_trainer import private_socket

DEFAULT_CLIENTAPP_PORT = 9094
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
DEFAULT_SUPEREXEC_POLL_S = "0.1"
ORDINAL_RE = re.compile(r"-(\d+)$")


def _env_int(name: str) -> int | None:
    return env_int(name)  # FEDTUNE_PARTITION_ID=abc: one line naming the variable, not a traceback


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = OneLineParser(
        prog="fedtune-supernode", description="Start a Flower SuperNode for one fedtune partition."
    )
    parser.add_argument("--superlink", default=env("FEDTUNE_SUPERLINK"), help="HOST:PORT of the SuperLink")
    parser.add_argument(
        "--root-certificates", default=env("FEDTUNE_ROOT_CERTIFICATES"),
        help="CA certificate the SuperLink's certificate must chain to",
    )
    parser.add_argument("--insecure", action="store_true", default=env_flag("FEDTUNE_INSECURE"))
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--partition-id", type=int, default=_env_int("FEDTUNE_PARTITION_ID"))
    part.add_argument(
        "--partition-from-ordinal", action="store_true",
        default=env_flag("FEDTUNE_PARTITION_FROM_ORDINAL"),
        help="partition = trailing -N of $POD_NAME (or the hostname) + --partition-offset",
    )
    parser.add_argument("--partition-offset", type=int, default=_env_int("FEDTUNE_PARTITION_OFFSET") or 0)
    parser.add_argument("--num-partitions", type=int, default=_env_int("FEDTUNE_NUM_PARTITIONS") or 20)
    parser.add_argument(
        "--data-path", default=env("FEDTUNE_DATA_PATH"),
        help="train on this node's own Alpaca-format file/folder instead of a partition of the dataset",
    )
    parser.add_argument(
        "--clientapp-port", type=port_arg,
        default=env_port("FEDTUNE_CLIENTAPP_PORT", DEFAULT_CLIENTAPP_PORT),
        help="local ClientApp runtime port (unique per SuperNode on one host)",
    )
    parser.add_argument(
        "--auth-key", default=env("FEDTUNE_AUTH_KEY"),
        help="ECDSA private key registered with `flwr supernode register` (SuperNode auth)",
    )
    parser.add_argument("--max-retries", type=int, default=_env_int("FEDTUNE_MAX_RETRIES"))
    parser.add_argument("--max-wait-time", type=float, default=None)
    parser.add_argument(
        "--warm-trainer", action="store_true", default=env_flag("FEDTUNE_WARM_TRAINER"),
        help="keep the model loaded across rounds in a node-local trainer (docs/performance.md)",
    )
    parser.add_argument(
        "--trainer-socket", default=env("FEDTUNE_TRAINER_SOCKET"),
        help="Unix socket of the warm trainer, in a 0700 folder of this user "
        "(default: a fresh private folder under $XDG_RUNTIME_DIR or the temp folder)",
    )
    parser.add_argument(
        "--compile-cache", default=env("FEDTUNE_COMPILE_CACHE_DIR"),
        help="persistent folder for torch.compile's caches, kept across warm-trainer restarts "
        "(default: ~/.cache/fedtune/torch-compile)",
    )
    parser.add_argument(
        "--warm-trainer-preload", default=env("FEDTUNE_WARM_TRAINER_PRELOAD"), metavar="RUN_CONFIG_TOML",
        help="load this run config's model when the warm trainer starts (else on the first round)",
    )
    parser.add_argument(
        "--cold-clientapp", action="store_true", default=env_tristate(PRESTART_ENV) is False,
        help="start a fresh flwr-clientapp for every message, as Flower does "
        "(default: one is started ahead, while the node waits)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the command and exit")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: passed to flower-supernode")
    return parser


def ordinal_of(name: str) -> int:
    """StatefulSet pods are named <set>-<ordinal>; the ordinal picks the data partition."""
    match = ORDINAL_RE.search(name)
    if not match:
        raise FedTuneError(f"cannot derive a partition from name {name!r}: expected a trailing -<number>")
    return int(match.group(1))


def resolve_partition(args: argparse.Namespace) -> int:
    if args.partition_from_ordinal:
        name = os.environ.get("POD_NAME") or socket.gethostname()
        partition = ordinal_of(name) + args.partition_offset
    elif args.partition_id is not None:
        partition = args.partition_id
    elif args.data_path:
        partition = 0  # a node with its own data needs no partition of the shared dataset
    else:
        raise FedTuneError("give --partition-id N, --partition-from-ordinal, or --data-path")
    if args.num_partitions < 1:
        raise FedTuneError(f"--num-partitions must be >= 1, got {args.num_partitions}")
    if not 0 <= partition < args.num_partitions:
        raise FedTuneError(
            f"partition id {partition} is outside 0..{args.num_partitions - 1} (--num-partitions)"
        )
    return partition


def node_config(args: argparse.Namespace, partition: int) -> str:
    """Flower's `--node-config` string: what the ClientApp reads from `context.node_config`."""
    items = [f"partition-id={partition}", f"num-partitions={args.num_partitions}"]
    if args.data_path:
        items.append(f"data-path={json.dumps(str(args.data_path))}")
    if getattr(args, "warm_trainer", False):
        items.append(f"{SOCKET_NODE_CONFIG_KEY}={json.dumps(trainer_socket(args))}")
    return " ".join(items)


def trainer_socket(args: argparse.Namespace) -> str:
    """The warm trainer's socket (a private folder is made once per launch)."""
    if not getattr(args, "resolved_socket", None):
        args.resolved_socket = private_socket(args.trainer_socket, args.clientapp_port)
    return str(args.resolved_socket)


def build_command(args: argparse.Namespace) -> list[str]:
    if not args.superlink:
        raise FedTuneError("--superlink HOST:PORT is required (or FEDTUNE_SUPERLINK)")
    if ":" not in args.superlink:
        raise FedTuneError(f"--superlink must be HOST:PORT, got {args.superlink!r}")
    partition = resolve_partition(args)
    object_wait_seconds()  # FEDTUNE_OBJECT_WAIT_SECONDS=soon: one line here, before the trainer starts
    cmd = [
        "flower-supernode",
        "--superlink", args.superlink,
        "--node-config", node_config(args, partition),
        "--port", str(args.clientapp_port),
    ]
    if args.insecure:
        if args.auth_key:
            raise FedTuneError("--auth-key requires TLS; drop --insecure")
        cmd.append("--insecure")
    else:
        if not args.root_certificates:
            raise FedTuneError(
                "TLS needs --root-certificates CA_FILE (the federation's ca.crt); "
                "pass --insecure explicitly for a plaintext test setup"
            )
        # not PEM or expired: one line here (flwr would print a traceback, then the SuperNode hangs)
        cmd += ["--root-certificates", str(check_ca_file(args.root_certificates))]
    if args.auth_key:
        from fedtune.auth import load_private_key

        load_private_key(args.auth_key)  # a missing or unreadable key: one line here, not flwr's exit 3xx
        cmd += ["--auth-supernode-private-key", str(require_file(args.auth_key, "SuperNode auth key"))]
    if args.max_retries is not None:
        cmd += ["--max-retries", str(args.max_retries)]
    if args.max_wait_time is not None:
        cmd += ["--max-wait-time", str(args.max_wait_time)]
    if args.data_path and not os.path.exists(args.data_path):
        raise FedTuneError(f"--data-path not found: {args.data_path}")
    if args.data_path:
        check_local_data(args.data_path)  # a malformed JSONL fails here, not in round 1
    return cmd + passthrough(args.extra)


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cmd = build_command(args)
    if args.dry_run:
        print(" ".join(cmd))
        return
    find_executable(cmd[0])  # flwr must be installed: one clear line if not
    if args.warm_trainer:  # a supervised child that outlives this exec and ends with flower-supernode
        if args.warm_trainer_preload:
            require_file(args.warm_trainer_preload, "--warm-trainer-preload run config")
        cache = warm_trainer.compile_cache_dir(args.compile_cache)
        supervisor = warm_trainer.spawn(trainer_socket(args), args.warm_trainer_preload, cache)
        status = warm_trainer.wait_ready(trainer_socket(args), supervisor)
        print(f"warm trainer ready (pid {status.get('pid')}) at {trainer_socket(args)}", flush=True)
    sys.stdout.flush()
    # Flower's CLI through supernode.flower_entry: shorter idle poll, flwr's log lines through fedtune.logs
    env = flwr_env()
    # The SuperNode's SuperExec polls for the ClientApp task every 1 s by default (Flower's own knob)
    env.setdefault(SUPEREXEC_POLL_ENV, DEFAULT_SUPEREXEC_POLL_S)
    env[PRESTART_ENV] = "0" if args.cold_clientapp else "1"
    os.execve(sys.executable, [sys.executable, "-m", "supernode.flower_entry", *cmd[1:]], env)


if __name__ == "__main__":
    main()
