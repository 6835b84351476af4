"""The SuperLink's Control API, polled in-process: per-run status and network traffic (`flwr ls`)."""

from __future__ import annotations

import contextlib
from typing import Any

from fedtune.metrics.state import Traffic, parse_time


class SuperLinkPoller:
    """Lists runs over the Control API (what `flwr ls --format json` shows); reconnects after a failure."""

    def __init__(self, address: str, root_certificates: str | None, insecure: bool) -> None:
        self.address = address
        self.root_certificates = root_certificates
        self.insecure = insecure
        self._client: Any = None

    def _connect(self) -> Any:
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

        return ControlHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.insecure,
            root_certificates=None if self.insecure else self.root_certificates,
            interceptors=[
                CliClientHttpInterceptor(),
                RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
            ],
        )

    def poll(self) -> dict[str, Traffic]:
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest

        if self._client is None:
            self._client = self._connect()
        try:
            response = self._client.ListRuns(ListRunsRequest())
        except Exception:
            self.close()
            raise
        result: dict[str, Traffic] = {}
        for proto in response.run_dict.values():
            run = run_from_proto(proto)
            status = run.status.status
            if run.status.sub_status:
                status = f"{status}:{run.status.sub_status}"
            result[str(run.run_id)] = Traffic(
                status=status,
                bytes_sent=int(run.bytes_sent),
                bytes_recv=int(run.bytes_recv),
                started_at=parse_time(run.starting_at or run.pending_at),
            )
        return result

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):  # best effort
                self._client.close()
            self._client = None
