"""Container health checks (`HEALTHCHECK CMD fedtune-healthcheck superlink|supernode`): light, the
standard library and fedtune.runtime_env only (no flwr or torch import on every probe).

superlink: GET https://127.0.0.1:$FEDTUNE_PORT/health answers 200 (the Fleet/Control/Runtime server
           is up). The certificate is not verified here: this is the container asking itself, and the
           server certificate need not name 127.0.0.1. With FEDTUNE_INSECURE=1 plain HTTP is used.
supernode: the SuperNode's local ClientApp runtime port ($FEDTUNE_CLIENTAPP_PORT, default 9094)
           accepts connections, i.e. flower-supernode is up and serving its ClientApps.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import urllib.request

from fedtune.runtime_env import env_flag


def superlink() -> None:
    port = int(os.environ.get("FEDTUNE_PORT") or 8000)
    scheme = "http" if env_flag("FEDTUNE_INSECURE") else "https"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    kwargs = {"context": context} if scheme == "https" else {}
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=5, **kwargs) as resp:
        if resp.status != 200:
            raise SystemExit(f"superlink /health answered {resp.status}")


def supernode() -> None:
    port = int(os.environ.get("FEDTUNE_CLIENTAPP_PORT") or 9094)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def main() -> None:
    role = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("FEDTUNE_ROLE", "")
    checks = {"superlink": superlink, "supernode": supernode}
    if role not in checks:
        raise SystemExit(f"usage: fedtune-healthcheck {{{'|'.join(checks)}}}")
    try:
        checks[role]()
    except (OSError, ValueError) as err:
        raise SystemExit(f"{role} unhealthy: {err}") from None


if __name__ == "__main__":
    main()
