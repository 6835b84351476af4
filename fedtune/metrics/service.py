"""The exporter as a service: the HTTP endpoint plus the threads that refresh its sources."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, ProcessCollector

from fedtune.metrics.collector import FedTuneCollector
from fedtune.metrics.http import make_http_server
from fedtune.metrics.notify import DEFAULT_PORT
from fedtune.metrics.state import State
from fedtune.metrics.superlink import SuperLinkPoller

log = logging.getLogger("fedtune.metrics")


class Exporter:
    """The endpoint plus its refresh threads; `start()` returns at once, `stop()` ends it. The endpoint has
    threads of its own: it keeps answering while a scan or a SuperLink poll is slow."""

    def __init__(
        self,
        roots: Iterable[Path],
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        poller: SuperLinkPoller | None = None,
        interval: float = 1.0,
        superlink_interval: float = 5.0,
        max_runs: int = 20,
    ) -> None:
        self.state = State(roots, max_runs)
        self.poller = poller
        self.interval = interval
        self.superlink_interval = superlink_interval
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FedTuneCollector(self.state))
        ProcessCollector(registry=self.registry, namespace="fedtune_exporter")
        self.server = make_http_server(host, port, self.state, self.registry)
        self._stop = threading.Event()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> Exporter:
        self.state.refresh()
        targets = [("serve", self.server.serve_forever), ("results", self._results_loop)]
        if self.poller is not None:
            targets.append(("superlink", self._superlink_loop))
        for name, target in targets:
            threading.Thread(target=target, name=f"fedtune-exporter-{name}", daemon=True).start()
        return self

    def _results_loop(self) -> None:
        while not self._stop.is_set():
            self.state.wake.wait(self.interval)
            self.state.wake.clear()
            try:
                self.state.refresh()
            except Exception:  # keep serving whatever happens to one scan
                log.exception("scanning results failed")

    def _superlink_loop(self) -> None:
        assert self.poller is not None
        failing = False
        while not self._stop.is_set():
            try:
                self.state.set_traffic(self.poller.poll())
                if failing:
                    log.info("SuperLink Control API reachable again at %s", self.poller.address)
                failing = False
            except Exception as err:
                self.state.set_traffic(None)
                if not failing:
                    log.warning("SuperLink Control API at %s: %s", self.poller.address, err)
                failing = True
            self._stop.wait(self.superlink_interval)

    def stop(self) -> None:
        self._stop.set()
        self.state.wake.set()
        self.server.shutdown()
        self.server.server_close()
        if self.poller is not None:
            self.poller.close()
