"""`fedtune connection NAME ADDRESS --ca CA.crt`: add (or replace) a SuperLink connection for the `flwr`
CLI in $FLWR_HOME/config.toml, keeping the others; `--insecure` for a SuperLink without TLS,
`--simulation` for Flower's local simulation engine. Then `flwr run . NAME`, `flwr ls NAME`."""

from __future__ import annotations

import argparse
import os

from fedtune.errors import FedTuneError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="connection name, e.g. remote-deployment")
    parser.add_argument("address", nargs="?", help="the SuperLink's HOST:PORT (the operator's port)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--ca", "--root-certificates", dest="ca", help="the SuperLink's CA certificate (PEM)")
    mode.add_argument("--insecure", action="store_true", help="no TLS (loopback experiments only)")
    mode.add_argument("--simulation", action="store_true", help="Flower's local simulation engine")
    parser.add_argument("--flwr-home", default=os.environ.get("FLWR_HOME", "~/.flwr"),
                        help="default: $FLWR_HOME, else ~/.flwr")
    parser.add_argument("--no-default", action="store_true", help="keep the current default connection")


def run(args: argparse.Namespace) -> int:
    from fedtune.flwr_config import write_connection, write_simulation_connection

    default = not args.no_default
    if args.simulation:
        if args.address:
            raise FedTuneError("--simulation takes no address")
        path = write_simulation_connection(args.flwr_home, args.name, make_default=default)
        what = "Flower simulation engine"
    else:
        if not args.address:
            raise FedTuneError("give the SuperLink's address (HOST:PORT), or --simulation")
        if not args.ca and not args.insecure:
            raise FedTuneError("give --ca CA.crt (the SuperLink's CA certificate), or --insecure")
        path = write_connection(args.flwr_home, args.name, args.address, None if args.insecure else args.ca,
                                make_default=default)
        what = f"{args.address}, " + ("insecure" if args.insecure else f"TLS with CA {args.ca}")
    print(f"connection {args.name!r} ({what}) written to {path}" + (" as the default" if default else ""))
    return 0
