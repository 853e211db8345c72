"""The network layer's settings: one node's libp2p overlay (``overlay.p2p``), validated once here.

:class:`P2PConfig` is also the ``[network]`` section of a daemon's ``config.toml``: a field whose metadata
has a ``help`` is a setting there (``node.config`` writes the template and reads the file, ``SHOAL_<KEY>``
and, with ``flag``, ``shoal run --<key>`` from it). The others are tuning knobs for tests, and ``limits``,
which the daemon derives from its model's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.overlay.allowlist import Allowlist, load_allowlist
from shoal.overlay.host import parse_bootstrap, parse_multiaddr
from shoal.overlay.wire import DEFAULT_LIMITS, Limits


@dataclass(frozen=True)
class P2PConfig:
    listen: tuple[str, ...] = field(
        default=("/ip4/127.0.0.1/tcp/0",),
        metadata={
            "help": "Multiaddrs to listen on. 0.0.0.0 listens on every interface (each is announced by "
            "its own address).",
            "flag": True,
            "metavar": "MULTIADDR",
        },
    )
    announce: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Addresses to announce instead, e.g. the public address of a port forward. Empty: the "
            "listen ones.",
            "flag": True,
            "metavar": "MULTIADDR",
        },
    )
    bootstrap: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Nodes to join, as `shoal id` prints them on those nodes: /ip4/<ip>/tcp/<port>/p2p/<peer "
            "id>. Empty: this node starts a swarm of its own and others join it.",
            "flag": True,
            "metavar": "MULTIADDR",
        },
    )
    relay_service: bool = field(
        default=False,
        metadata={
            "help": "Serve as a Circuit Relay v2 relay for nodes behind NAT (only useful on a publicly "
            "reachable node).",
            "flag": True,
        },
    )
    upnp: bool = field(
        default=False,
        metadata={
            "help": "ask the router for a port mapping by UPnP (adds about 4 s to the start)",
            "flag": True,
        },
    )
    bootstrap_attempts: int = 5
    ping_interval: float = field(
        default=2.0,
        metadata={
            "group": 'Failure detection (phi accrual, docs/measurements.md): a peer\'s silence is '
            "judged against the gaps between its earlier answers; any traffic from it counts too.",
            "help": "seconds between pings to each peer",
        },
    )
    ping_timeout: float = field(
        default=10.0,
        metadata={"help": "seconds sending a ping may wait (its answer counts whenever it comes)"},
    )
    suspect_phi: float = field(
        default=3.0, metadata={"help": "phi at which a silent peer is suspected (shown in /status only)"}
    )
    down_phi: float = field(default=8.0, metadata={"help": "phi at which a silent peer is cut off ..."})
    acceptable_pause: float = field(
        default=30.0,  # 10 s cut off 674 peers in 160 s of a 24-daemon demo on 2 cores, 30 s 151 (start-up)
        metadata={"help": "... after this many seconds of silence beyond its usual gaps"},
    )
    peers_low: int = field(
        default=8,
        metadata={
            "group": "The peer set: below peers_low task peers, more are dialled from the metadata "
            "document and the DHT; above peers_high, the worst newcomers are refused or let go, never "
            "the peers this node dialled nor long-lived ones (overlay/peerset.py).",
            "help": "task peers a node keeps at least, when the swarm has them",
        },
    )
    peers_high: int = field(default=32, metadata={"help": "task peers a node keeps at most"})
    peers_out: int = field(
        default=4,
        metadata={
            "help": "Of them, peers this node dials itself (chosen from the signed metadata records, "
            "spread over IP ranges), which peers dialling in can never displace; it dials more when it "
            "has fewer, even above peers_low. Capped at peers_low."
        },
    )
    peers_per_ip: int = field(
        default=4,
        metadata={
            "help": "Task peers from one remote IP at most (loopback and relayed peers exempt); a "
            "newcomer beyond it is refused. 0: no limit."
        },
    )
    allowlist: str = field(
        default="",
        metadata={
            "group": "Closed swarm (optional): only the peers on a list signed by the founder take part; "
            "connections of all others are closed. Relays and bootstrap nodes must be on it too.",
            "help": "File of admitted peer ids signed by the founder (`shoal allowlist` writes it; a "
            "relative path is taken from the config file's directory). Empty: an open swarm.",
        },
    )
    founder: str = field(
        default="", metadata={"help": "peer id of the founder whose signature the allowlist must carry"}
    )
    send_timeout: float = 120.0
    receive_timeout: float = 120.0
    sync_interval: float = 5.0
    heartbeat_interval: float = 10.0
    metadata_epoch: float = field(
        default=300.0,
        metadata={
            "help": "Seconds of wall-clock time per metadata document: every node starts a fresh one at "
            "each boundary (tombstones and junk last one epoch; members stay). The same on every node."
        },
    )
    hole_punch_timeout: float = 10.0
    max_penalty: int = field(
        default=5, metadata={"help": "wrong inputs (malformed, implausible, floods) that ban a peer"}
    )
    ban_duration: float = field(
        default=600.0,
        metadata={
            "help": "Seconds a peer stays cut off after sending too much wrong input (malformed, "
            "implausible, floods); its penalties are forgotten after as long without one."
        },
    )
    log_interval: float = 60.0  # rejections beyond the first few per interval are summarised once in it
    max_inflight: int = 512 * 2**20  # bytes of incoming frames being received, all peers together
    max_peer_inflight: int | None = None  # the same for one peer; None: 2 * limits.max_message
    min_rate: float = 64 * 1024  # bytes/s an incoming frame must keep up in every rate_window
    rate_window: float = 5.0  # seconds, also the grace period at a frame's start
    # Inbound streams and messages per second per peer, sustained, and at once: four times what a clean
    # MoDeST swarm at full speed sends (measured: 50 a second between two of three daemons doing 8 rounds
    # a second of a small model; 20/s made honest MoDeST daemons blame each other), far below floods.
    message_rate: float = 200.0
    message_burst: int = 400
    limits: Limits = field(default=DEFAULT_LIMITS)

    def __post_init__(self) -> None:
        if not self.listen:
            raise ValueError("listen: give at least one address, e.g. /ip4/0.0.0.0/tcp/4001")
        parsers = {"listen": parse_multiaddr, "announce": parse_multiaddr, "bootstrap": parse_bootstrap}
        for name, parse in parsers.items():
            for addr in getattr(self, name):
                try:
                    parse(addr)  # its message names the address and the fix, before anything starts
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        for name in (
            "ping_interval",
            "ping_timeout",
            "send_timeout",
            "receive_timeout",
            "sync_interval",
            "heartbeat_interval",
            "metadata_epoch",
            "hole_punch_timeout",
            "ban_duration",
            "log_interval",
            "min_rate",
            "rate_window",
            "message_rate",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"intervals, timeouts and rates must be positive: {name} = {getattr(self, name)}"
                )
        if self.sync_interval < 1:
            raise ValueError("sync_interval must be at least 1 s (the sync loop ticks once a second)")
        for name in ("max_penalty", "message_burst", "peers_low"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.peers_high < self.peers_low:
            raise ValueError(f"peers_high ({self.peers_high}) must be at least peers_low ({self.peers_low})")
        if not 0 < self.suspect_phi < self.down_phi or self.acceptable_pause < 0:
            raise ValueError(
                f"need 0 < suspect_phi ({self.suspect_phi}) < down_phi ({self.down_phi}) and "
                f"acceptable_pause ({self.acceptable_pause}) >= 0"
            )
        for name in ("peers_out", "peers_per_ip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")
        if self.founder and not self.allowlist:
            raise ValueError("founder is set but allowlist is not: give the founder's signed allowlist too")
        self.admission()  # a missing, changed or unsigned allowlist stops the node here, naming the file
        if not self.limits.max_message <= self.peer_inflight <= self.max_inflight:
            raise ValueError(
                f"need limits.max_message ({self.limits.max_message}) <= max_peer_inflight "
                f"({self.peer_inflight}) <= max_inflight ({self.max_inflight}): otherwise no message "
                "of the largest size could ever be received"
            )

    def admission(self) -> Allowlist | None:
        """The allowlist of a closed swarm (``overlay.allowlist``), read and verified; None: open."""
        return load_allowlist(self.allowlist, self.founder) if self.allowlist else None

    @property
    def peer_inflight(self) -> int:
        """Per-peer bytes in flight: ``max_peer_inflight``, or two messages of the largest size."""
        if self.max_peer_inflight is not None:
            return self.max_peer_inflight
        return min(2 * self.limits.max_message, self.max_inflight)
