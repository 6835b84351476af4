"""The metrics wing: `fedtune-exporter`, Prometheus metrics of fedtune runs from a long-lived process on the
SuperLink host, and the tiny notifier the ServerApp calls after each round.

Why a separate process: Flower starts a new, short-lived ServerApp process per run, so an endpoint inside it
would vanish between runs (and with a crashed run). The exporter lives as long as the SuperLink (the
`fedtune-superlink` launcher starts it beside the SuperLink when FEDTUNE_METRICS_PORT is set; it exits
when the SuperLink does) and is fed from two sources:

1. results.json of every run under the output root(s) (fedtune.results, rewritten atomically after every
   round): the durable source of truth. A file is re-read when its mtime/size changes and every series is
   rebuilt from it, so an exporter restart loses nothing and counters stay monotonic. The ServerApp also
   POSTs the file's path to /api/v1/notify after each round (loopback only), so a round shows at once and
   runs writing outside the output root are found.
2. The SuperLink's Control API (what `flwr ls` shows): per-run status and network traffic.

Rooms: `notify` (ServerApp side, no prometheus_client), `state` (what is known about each run, bounded),
`table` (every metric in one table), `collector` (table → families, one run at a time), `superlink`
(Control API poller), `http` (the endpoint), `service` (threads), `cli`, `sidecar` (launcher side).
This package's __init__ imports nothing, so the notifier stays light.
"""
