"""The SuperLink's public face: an nginx TLS reverse proxy that lets through only the Fleet API.

Flower >= 1.40 serves the Fleet, Control and Runtime APIs on one HTTPS port, and neither the Control
API (start-run, register-node) nor the Runtime API (acquire-task hands out a run's ServerApp token)
authenticates its callers in open-source Flower. SuperNodes belong to other organisations, so they must
reach the Fleet API only. `fedtune-superlink` therefore binds Flower's SuperLink to 127.0.0.1 (operators,
the SuperExec and the exporter connect there, from the SuperLink host/container/pod) and runs nginx on
the public port with the config rendered here: `/v1/fleet/<name>` (POST) and `GET /health` go on to the
SuperLink over TLS, verified against the federation's CA; everything else is answered 403 by nginx.

Facts from flwr 1.42's source the config is sized by: SuperNodes speak protobuf over HTTP/1.1 (httpx,
unary POSTs, no streaming on the Fleet API) to `/v1/fleet/<kebab-name>` with no query string; arrays
move in chunks of FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE (Flower's 5 MiB by default, at most 24 MiB,
fedtune.runtime_env) and a FAB is at most 10 MB; the client gives up after 30 s without progress, while
the SuperLink may hold a request up to its SQLite busy timeout (60 s, superlink/flower_entry.py).

One renderer for every deployment: `fedtune-superlink` (hosts, compose, LocalFederation) writes it to its
runtime folder; the Helm chart uses the same text: `python -m superlink.proxy --print-config ...`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedtune.atomic import write_text
from fedtune.errors import FedTuneError, one_line_errors
from fedtune.preflight import OneLineParser, env_port, port_arg

DEFAULT_PUBLIC_PORT = 8000  # what SuperNodes dial
DEFAULT_INTERNAL_PORT = 9000  # Flower's SuperLink, on 127.0.0.1 only
# Name the proxy verifies in the SuperLink's certificate: nginx matches DNS names only (not IP SANs),
# and fedtune-certs always puts localhost in the server certificate.
UPSTREAM_TLS_NAME = "localhost"
# Array chunks (at most fedtune.runtime_env.MAX_CHUNK_BYTES, 24 MiB) and 10 MB FABs, plus protobuf framing;
# a larger body is refused with 413.
MAX_BODY = "32m"
# How much of a body nginx moves between a node and the SuperLink at a time (buffering is off both ways).
STREAM_BUFFER = "256k"
# Above the SuperLink's 60 s SQLite busy timeout, so nginx never cuts a request the SuperLink still serves.
TIMEOUT_S = 300
# The Fleet API's endpoints are lowercase kebab-case names; nothing else (no "..", no %-escapes, no
# query string) is forwarded, whatever the SuperLink's router would make of it.
FLEET_URI = r"^/v1/fleet/[a-z0-9-]+$"
# nginx drops an idle upstream connection after UPSTREAM_IDLE_S; the SuperLink's uvicorn must never drop one
# first, or nginx sends the next request on a connection uvicorn is closing and it hangs until the
# SuperNode's 30 s timeout. uvicorn arms its keep-alive timer when a response is handed to its socket
# buffer, not when nginx has read it: a 16 MiB chunk to a node on a 50 Mbit/s link takes ~3 s more to
# drain, so Flower's 5 s would race. superlink/flower_entry.py runs uvicorn with SUPERLINK_KEEP_ALIVE_S.
UPSTREAM_IDLE_S = 3
SUPERLINK_KEEP_ALIVE_S = 3600
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


@dataclass(frozen=True)
class ProxyConfig:
    """Everything the nginx config depends on."""

    listen_host: str
    listen_port: int
    upstream_port: int
    server_cert: Path
    server_key: Path
    ca_cert: Path
    # pid file and nginx's temp folders (so it runs as any user, with a read-only root filesystem)
    runtime_dir: Path
    upstream_host: str = "127.0.0.1"
    max_body: str = MAX_BODY
    timeout_s: int = TIMEOUT_S
    stream_buffer: str = STREAM_BUFFER


def _listen(host: str, port: int) -> str:
    if ":" in host:  # IPv6 literal
        return f"[{host.strip('[]')}]:{port}"
    return f"{host}:{port}"


def render(cfg: ProxyConfig) -> str:
    """The complete nginx.conf (main context) for `cfg`."""
    run = cfg.runtime_dir
    temp = "\n".join(f"    {name}_temp_path {run / name};" for name in TEMP_DIRS)
    t = f"{cfg.timeout_s}s"
    return f"""\
# Rendered by superlink/proxy.py: only the Fleet API and GET /health reach the SuperLink.
daemon off;
worker_processes 1;
pid {run / "nginx.pid"};
error_log stderr warn;

events {{
    worker_connections 1024;
}}

http {{
    server_tokens off;
{temp}
    default_type application/octet-stream;
    # One JSON line per refused request (who tried what); allowed traffic is logged by the SuperLink.
    log_format fedtune_denied escape=json
        '{{"event":"proxy-denied","time":"$time_iso8601","remote":"$remote_addr",'
        '"method":"$request_method","uri":"$request_uri","status":$status}}';
    # (4xx only: an upstream error such as 502 while the SuperLink starts is in nginx's error log)
    map $status $fedtune_log_denied {{
        ~^4 1;
        499 0;  # the client gave up waiting (a timeout on its side): not a refusal
        default 0;
    }}
    access_log /dev/stdout fedtune_denied if=$fedtune_log_denied;

    client_max_body_size {cfg.max_body};
    client_body_timeout {t};
    send_timeout {t};
    # Stream request and response bodies (array chunks) instead of spooling them to disk, in pieces of
    # {cfg.stream_buffer} each way (nginx's default is one 4-8 KiB page: ~1,300 reads and TLS records per
    # 5 MiB chunk; this is at most 2 x {cfg.stream_buffer} per connection in flight).
    proxy_request_buffering off;
    proxy_buffering off;
    client_body_buffer_size {cfg.stream_buffer};
    proxy_buffer_size {cfg.stream_buffer};
    proxy_buffers 4 {cfg.stream_buffer};  # unused with buffering off; nginx checks them against the above
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    # Overwritten, never appended: a client cannot inject its own X-Forwarded-For.
    proxy_set_header X-Forwarded-For $remote_addr;
    proxy_set_header X-Forwarded-Proto https;
    proxy_connect_timeout 10s;
    proxy_read_timeout {t};
    proxy_send_timeout {t};
    # TLS to the SuperLink too, verified against the federation's CA.
    proxy_ssl_trusted_certificate {cfg.ca_cert};
    proxy_ssl_verify on;
    proxy_ssl_verify_depth 2;
    proxy_ssl_name {UPSTREAM_TLS_NAME};
    proxy_ssl_session_reuse on;

    upstream fedtune_superlink {{
        server {_listen(cfg.upstream_host, cfg.upstream_port)};
        keepalive 16;
        # nginx must drop an idle connection before the SuperLink (which waits {SUPERLINK_KEEP_ALIVE_S} s)
        # does, or a request sent on a connection uvicorn is closing hangs ("upstream prematurely closed")
        keepalive_timeout {UPSTREAM_IDLE_S}s;
    }}

    server {{
        listen {_listen(cfg.listen_host, cfg.listen_port)} ssl;
        ssl_certificate {cfg.server_cert};
        ssl_certificate_key {cfg.server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:fedtune_tls:1m;

        location /v1/fleet/ {{
            if ($request_uri !~ "{FLEET_URI}") {{
                return 403;
            }}
            limit_except POST {{
                deny all;
            }}
            proxy_pass https://fedtune_superlink;
        }}

        location = /health {{
            limit_except GET {{
                deny all;
            }}
            proxy_pass https://fedtune_superlink;
        }}

        # Control (/v1/control/*), Runtime (/v1/runtime/*) and anything else: never from outside.
        location / {{
            return 403;
        }}
    }}
}}
"""


def find_nginx() -> str:
    """The nginx binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    found = shutil.which("nginx", path=search)
    if found is None:
        raise FedTuneError(
            "nginx not found: the SuperLink's Fleet-only proxy needs it "
            "(apt-get install nginx-light, or scripts/install-proxy.sh)"
        )
    return found


def write(cfg: ProxyConfig) -> Path:
    """Render the config into `cfg.runtime_dir` (with nginx's temp folders); returns its path."""
    cfg.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in TEMP_DIRS:
        (cfg.runtime_dir / name).mkdir(exist_ok=True, mode=0o700)
    return write_text(cfg.runtime_dir / "nginx.conf", render(cfg))


def command(nginx: str, conf: Path) -> list[str]:
    """nginx in the foreground on `conf`; errors to stderr from the first line (before the config is read)."""
    return [nginx, "-e", "stderr", "-p", str(conf.parent), "-c", str(conf)]


def check(nginx: str, conf: Path) -> None:
    """`nginx -t`: one clear line when the config (or a certificate it loads) is rejected."""
    done = subprocess.run([*command(nginx, conf), "-t", "-q"], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if "[emerg]" in line] or done.stderr.splitlines()
        raise FedTuneError(f"proxy config rejected by nginx: {(lines or ['?'])[-1].strip()}")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = OneLineParser(
        prog="python -m superlink.proxy",
        description="Render the nginx config of the SuperLink's Fleet-only TLS proxy.",
    )
    parser.add_argument("--print-config", action="store_true", help="print nginx.conf (the default)")
    parser.add_argument("--listen-host", default=env("FEDTUNE_HOST", "0.0.0.0"))
    parser.add_argument("--listen-port", type=port_arg, default=env_port("FEDTUNE_PORT", DEFAULT_PUBLIC_PORT))
    parser.add_argument(
        "--upstream-port", type=port_arg, default=env_port("FEDTUNE_INTERNAL_PORT", DEFAULT_INTERNAL_PORT)
    )
    certs = env("FEDTUNE_CERTS_DIR", "/certs")
    parser.add_argument("--ssl-certfile", default=os.path.join(certs, "server.pem"))
    parser.add_argument("--ssl-keyfile", default=os.path.join(certs, "server.key"))
    parser.add_argument("--ssl-ca-certfile", default=os.path.join(certs, "ca.crt"))
    parser.add_argument("--runtime-dir", default=env("FEDTUNE_PROXY_DIR", "/tmp/fedtune-proxy"))
    return parser


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = ProxyConfig(
        listen_host=args.listen_host,
        listen_port=args.listen_port,
        upstream_port=args.upstream_port,
        server_cert=Path(args.ssl_certfile),
        server_key=Path(args.ssl_keyfile),
        ca_cert=Path(args.ssl_ca_certfile),
        runtime_dir=Path(args.runtime_dir),
    )
    print(render(cfg), end="")


if __name__ == "__main__":
    main()
