"""The daemon's local HTTP API: ``GET /status`` (JSON) and ``GET /metrics`` (Prometheus text).

Served with h11 on the daemon's own trio loop: no second event loop, no thread. Both endpoints read
one status snapshot, so the JSON and the metrics never disagree. Requests are bounded (header size,
time), and anything but ``GET`` of those two paths gets a plain error status.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import h11
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("shoal.http")

MAX_REQUEST = 16 * 1024
REQUEST_TIMEOUT = 10.0
Status = Callable[[], dict[str, Any]]


def describe(metrics: dict[str, float | None]) -> str:
    """A task's metrics on one line (``/status`` gives None for a value that is not finite)."""
    parts = (f"{name} {value:.4g}" if value is not None else f"{name} -" for name, value in metrics.items())
    return ", ".join(parts) or "no metrics"


class StatusCollector(Collector):
    """Prometheus metrics computed from the status snapshot at scrape time."""

    def __init__(self, status: Status) -> None:
        self.status = status

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.status()
        yield GaugeMetricFamily("shoal_round", "Training round of this node's model", value=s["round"])
        yield GaugeMetricFamily("shoal_peers", "Peers of this task connected now", value=len(s["peers"]))
        metric = GaugeMetricFamily("shoal_metric", "What the task's evaluate returned", labels=["name"])
        for name, value in s["metrics"].items():
            if value is not None:
                metric.add_metric([name], value)
        yield metric
        for direction in ("in", "out"):
            family = CounterMetricFamily(f"shoal_bytes_{direction}", f"Bytes {direction}", labels=["kind"])
            for kind, count in sorted(s[f"bytes_{direction}"].items()):
                family.add_metric([kind], count)
            yield family
        yield CounterMetricFamily(
            "shoal_rejected", "Inputs rejected (malformed, oversized, unfit)", value=s["rejected"]
        )
        liveness = s["liveness"]
        yield GaugeMetricFamily(
            "shoal_peers_suspected",
            "Peers suspected by the failure detector now",
            value=len(liveness["suspected"]),
        )
        yield CounterMetricFamily("shoal_peers_down", "Peers found down and cut off", value=liveness["down"])
        yield CounterMetricFamily(
            "shoal_peer_flaps", "Peers found down that came back later", value=liveness["flaps"]
        )


async def serve(
    address: str, status: Status, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled; ``task_status.started`` gets the bound port (``address`` may use port 0)."""
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StatusCollector(status))

    def respond(target: str) -> tuple[int, str, bytes]:
        if target == "/status":
            return 200, "application/json", json.dumps(status(), indent=1).encode()
        if target == "/metrics":
            return 200, "text/plain; version=0.0.4", generate_latest(registry)
        return 404, "text/plain", b"not found: try /status or /metrics\n"

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(MAX_REQUEST))
                        continue
                    if isinstance(event, h11.Request):
                        if event.method != b"GET":
                            code, kind, body = 405, "text/plain", b"only GET\n"
                        else:
                            try:
                                code, kind, body = respond(
                                    event.target.decode(errors="replace").split("?")[0]
                                )
                            except Exception as e:  # a failing status must not take the daemon down
                                log.exception("API request %s failed", event.target)
                                code, kind, body = 500, "text/plain", f"internal error: {e}\n".encode()
                        headers = [
                            ("content-type", kind),
                            ("content-length", str(len(body))),
                            ("connection", "close"),
                        ]
                        await stream.send_all(conn.send(h11.Response(status_code=code, headers=headers)))
                        await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                    return
        except (h11.ProtocolError, trio.TooSlowError, trio.BrokenResourceError) as e:
            log.debug("API request failed: %s", e)
        finally:
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(int(port), host=host)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])
