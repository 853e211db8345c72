"""The network layer's settings: one node's libp2p overlay (``overlay.p2p``), validated once here."""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.overlay.host import parse_bootstrap
from shoal.overlay.wire import DEFAULT_LIMITS, Limits


@dataclass(frozen=True)
class P2PConfig:
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    announce: tuple[str, ...] = ()
    bootstrap: tuple[str, ...] = ()
    relay_service: bool = False
    upnp: bool = False
    bootstrap_attempts: int = 5
    ping_interval: float = 2.0
    ping_timeout: float = 2.0
    ping_misses: int = 3
    send_timeout: float = 120.0
    receive_timeout: float = 120.0
    sync_interval: float = 5.0
    heartbeat_interval: float = 10.0
    hole_punch_timeout: float = 10.0
    max_penalty: int = 5  # wrong inputs that ban a peer
    ban_duration: float = 600.0  # seconds a ban lasts; penalties are forgotten after as long without one
    log_interval: float = 60.0  # rejections beyond the first few per interval are summarised once in it
    max_inflight: int = 512 * 2**20  # bytes of incoming frames being received, all peers together
    max_peer_inflight: int | None = None  # the same for one peer; None: 2 * limits.max_message
    min_rate: float = 64 * 1024  # bytes/s an incoming frame must keep up in every rate_window
    rate_window: float = 5.0  # seconds, also the grace period at a frame's start
    message_rate: float = 20.0  # inbound streams per second per peer, sustained
    message_burst: int = 50  # inbound streams a peer may open at once before the rate applies
    limits: Limits = field(default=DEFAULT_LIMITS)

    def __post_init__(self) -> None:
        for addr in self.bootstrap:
            parse_bootstrap(addr)  # ValueError with a clear reason, before anything starts
        if (
            min(
                self.ping_interval,
                self.ping_timeout,
                self.send_timeout,
                self.receive_timeout,
                self.sync_interval,
                self.heartbeat_interval,
                self.hole_punch_timeout,
                self.ban_duration,
                self.log_interval,
                self.min_rate,
                self.rate_window,
                self.message_rate,
            )
            <= 0
        ):
            raise ValueError("intervals, timeouts and rates must be positive")
        if self.sync_interval < 1:
            raise ValueError("sync_interval must be at least 1 s (the sync loop ticks once a second)")
        if self.ping_misses < 1 or self.max_penalty < 1 or self.message_burst < 1:
            raise ValueError("ping_misses, max_penalty and message_burst must be at least 1")
        if not self.limits.max_message <= self.peer_inflight <= self.max_inflight:
            raise ValueError(
                f"need limits.max_message ({self.limits.max_message}) <= max_peer_inflight "
                f"({self.peer_inflight}) <= max_inflight ({self.max_inflight}): otherwise no message "
                "of the largest size could ever be received"
            )

    @property
    def peer_inflight(self) -> int:
        """Per-peer bytes in flight: ``max_peer_inflight``, or two messages of the largest size."""
        if self.max_peer_inflight is not None:
            return self.max_peer_inflight
        return min(2 * self.limits.max_message, self.max_inflight)
