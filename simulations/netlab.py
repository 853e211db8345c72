"""Linux network namespaces for emulated networks: the testbed's and the NAT tests' building blocks.

Loopback shows neither NATs nor capped links. A :class:`Namespaces` creates fresh namespaces (names
``<prefix><role>``), veth pairs made straight inside them (``ip -n NS link add ... peer ... netns
OTHER``: no interface ever exists in the root namespace, so the host's own networking is never
touched), bridges, rate caps and firewall rules, runs processes inside, and tears all of it down:
processes first (a namespace with a live process outlives ``ip netns del``), then the namespaces,
which takes their interfaces, qdiscs and iptables rules with them.

:func:`connect` opens a TCP connection from inside a namespace (``setns`` on the calling thread
for the ``socket`` call only), so a harness in the root namespace can read a daemon's local API.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

TIMEOUT = 10.0  # seconds for any one set-up or teardown command
KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL at teardown
CLONE_NEWNET = 0x40000000
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
HINT = "needs root, iproute2 and iptables (apt-get install iproute2 iptables)"


class NetnsError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def which(name: str) -> str | None:
    """Like shutil.which, but also look in sbin: we may run with a user's PATH."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))


def run(argv: Sequence[str], *, input: str | None = None, timeout: float = TIMEOUT) -> str:
    """Run a command to completion with a bound; raise NetnsError with its stderr on failure."""
    try:
        res = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"timed out after {timeout} s: {' '.join(argv)}") from e
    except OSError as e:
        raise NetnsError(f"cannot run {' '.join(argv)}: {e}") from e
    if res.returncode != 0:
        raise NetnsError(f"exit {res.returncode}: {' '.join(argv)}: {res.stderr.strip()}")
    return res.stdout


@functools.cache
def unavailable_reason() -> str | None:
    """Why namespaces with NAT can't be built here (for an error or pytest.skip), or None if they can.

    Probes for real, since containers often have the binaries but no CAP_NET_ADMIN or no netfilter
    NAT support: it creates a namespace, loads a MASQUERADE --random-fully rule in it, deletes it.
    """
    if os.geteuid() != 0:
        return f"not root; {HINT}"
    missing = [n for n in ("ip", "iptables", "iptables-restore", "tc") if not which(n)]
    if missing:
        return f"missing {', '.join(missing)}; {HINT}"
    probe = f"shl{os.getpid()}_{secrets.token_hex(2)}_probe"
    try:
        run([which("ip"), "netns", "add", probe])
    except NetnsError as e:
        return f"`ip netns add` failed ({e}); {HINT}"
    try:
        rule = "-t nat -A POSTROUTING -o lo -j MASQUERADE --random-fully"
        run([which("ip"), "netns", "exec", probe, which("iptables"), *rule.split()])
    except NetnsError as e:
        return f"iptables NAT doesn't work in a namespace ({e}); {HINT}"
    finally:
        with contextlib.suppress(NetnsError):
            run([which("ip"), "netns", "del", probe])
    return None


@functools.cache
def has_netem() -> bool:
    """Whether the kernel has the netem qdisc (added latency); many minimal kernels don't."""
    probe = f"shl{os.getpid()}_{secrets.token_hex(2)}_netem"
    ip = which("ip") or "ip"
    try:
        run([ip, "netns", "add", probe])
    except NetnsError:
        return False
    try:
        run([ip, "netns", "exec", probe, which("tc") or "tc", "qdisc", "add", "dev", "lo", "root", "netem"])
        return True
    except NetnsError:
        return False
    finally:
        with contextlib.suppress(NetnsError):
            run([ip, "netns", "del", probe])


def leftovers(prefix: str) -> list[str]:
    """Namespaces whose names start with ``prefix`` (what a teardown must leave none of)."""
    return [
        line.split()[0]
        for line in run([which("ip") or "ip", "netns", "list"]).splitlines()
        if line.startswith(prefix)
    ]


def new_prefix(tag: str) -> str:
    """A namespace-name prefix unique to this process and call: ``<tag><pid>_<hex>_``."""
    return f"{tag}{os.getpid()}_{secrets.token_hex(2)}_"


def home_router_rules(random_ports: bool) -> str:
    """A home router's iptables-restore ruleset, between interfaces ``wan`` and ``lan``: MASQUERADE
    on ``wan`` (``--random-fully`` if ``random_ports``: a new port per connection, so hole punching
    fails), LAN→WAN forwarded freely, WAN→LAN and to the router itself only for ESTABLISHED,RELATED;
    unsolicited packets are dropped, so they time out instead of being refused."""
    random = " --random-fully" if random_ports else ""
    return (
        "*nat\n"
        ":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":POSTROUTING ACCEPT [0:0]\n"
        f"-A POSTROUTING -o wan -j MASQUERADE{random}\n"
        "COMMIT\n"
        "*filter\n"
        ":INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        "-A INPUT -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
        "-A INPUT -i wan -j DROP\n"
        # Conntrack can't NAT an INVALID packet (e.g. a SYN with a new ISN on a half-open entry);
        # forwarding it would leak a private source address onto the internet.
        "-A FORWARD -m conntrack --ctstate INVALID -j DROP\n"
        "-A FORWARD -i lan -o wan -j ACCEPT\n"
        "-A FORWARD -i wan -o lan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
        "COMMIT\n"
    )


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def connect(ns: str, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection made from inside namespace ``ns``; the caller's thread is back in its own
    namespace when this returns (a socket keeps the namespace it was created in)."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(there)
            try:
                return socket.create_connection((host, port), timeout=timeout)
            finally:
                _setns(here)
        finally:
            os.close(there)
    finally:
        os.close(here)


class Namespaces:
    """Namespaces created under one prefix, the processes started in them, and their teardown."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.created: list[str] = []  # namespaces, in creation order
        self.procs: list[subprocess.Popen] = []
        ip, restore, tc = which("ip"), which("iptables-restore"), which("tc")
        if not ip or not restore or not tc:
            raise NetnsError(f"missing ip, tc or iptables-restore; {HINT}")
        self.ip, self.iptables_restore, self.tc = ip, restore, tc

    def add(self, role: str) -> str:
        """A new namespace with loopback up; its full name."""
        ns = self.prefix + role
        run([self.ip, "netns", "add", ns])
        self.created.append(ns)
        self.link(ns, "link", "set", "lo", "up")
        return ns

    def link(self, ns: str, *args: str) -> None:
        """``ip -n ns ARGS``."""
        run([self.ip, "-n", ns, *args])

    def veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        """A veth pair created straight inside two namespaces; it never exists in the root one."""
        self.link(ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b)

    def bridge(self, ns: str, name: str, *addresses: str) -> None:
        self.link(ns, "link", "add", name, "type", "bridge")
        for address in addresses:
            self.link(ns, "addr", "add", address, "dev", name)
        self.link(ns, "link", "set", name, "up")

    def sysctl(self, ns: str, settings: dict[str, int]) -> None:
        """Write /proc/sys/<key> inside ns; via sh because sysctl(8) (procps) may be missing."""
        script = "; ".join(f"echo {v} > /proc/sys/{k}" for k, v in settings.items())
        run([self.ip, "netns", "exec", ns, "sh", "-ec", script])

    def firewall(self, ns: str, rules: str) -> None:
        """Load an iptables-restore ruleset in ns, atomically."""
        run([self.ip, "netns", "exec", ns, self.iptables_restore], input=rules)

    def shape(self, ns: str, dev: str, mbit: float, delay_ms: float = 0.0) -> None:
        """Cap what ``dev`` sends at ``mbit`` Mbit/s (token bucket); with ``delay_ms``, netem adds that
        delay first (raises NetnsError where the kernel has no netem). The bucket holds at least a
        64 KiB segment: veth passes GSO segments that big, and tbf drops what exceeds its burst."""
        tc = [self.ip, "netns", "exec", ns, self.tc, "qdisc", "add", "dev", dev]
        burst = max(64 * 1024, int(mbit * 1e6 / 8 / 100))  # and at least 10 ms at the rate
        tbf = ["tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "200ms"]
        if delay_ms > 0:
            run([*tc, "root", "handle", "1:", "netem", "delay", f"{delay_ms}ms"])
            run([*tc, "parent", "1:1", "handle", "10:", *tbf])
        else:
            run([*tc, "root", *tbf])

    def popen(self, ns: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start argv inside namespace ns (``ip netns exec`` execs it: the pid is argv's); it is killed
        at teardown if still running. Defaults to a new session so teardown can kill its group."""
        if ns not in self.created:
            raise ValueError(f"{ns!r} is not a namespace of this lab ({self.created})")
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen([self.ip, "netns", "exec", ns, *argv], **kw)
        self.procs.append(p)
        return p

    def run(self, ns: str, argv: Sequence[str], timeout: float = TIMEOUT) -> str:
        """Run argv inside ns to completion and return stdout (e.g. `iptables -L -v -n`)."""
        return run([self.ip, "netns", "exec", ns, *argv], timeout=timeout)

    def close(self) -> list[str]:
        """Kill leftover processes, then delete every namespace created; return the errors."""
        errors = []
        live = [p for p in self.procs if p.poll() is None]
        for sig, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 2.0)):
            for p in live:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if os.getpgid(p.pid) == p.pid:  # own session: take its children too
                        os.killpg(p.pid, sig)
                    else:
                        p.send_signal(sig)
            deadline = time.monotonic() + grace
            for p in live:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
            live = [p for p in live if p.poll() is None]
            if not live:
                break
        errors += [f"pid {p.pid} survived SIGKILL: {p.args}" for p in live]
        # and any under our prefix not recorded: an interrupt between `ip netns add` and the record
        unrecorded = [ns for ns in leftovers(self.prefix) if ns not in self.created]
        for ns in [*unrecorded, *reversed(self.created)]:
            self._kill_pids(ns)
            try:
                run([self.ip, "netns", "del", ns])
            except NetnsError as e:
                errors.append(str(e))
        self.created.clear()
        return errors

    def _kill_pids(self, ns: str) -> None:
        """SIGKILL whatever still runs in a namespace (started by someone else, e.g. a daemon's child)."""
        with contextlib.suppress(NetnsError):
            for pid in run([self.ip, "netns", "pids", ns]).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)


Lab = TypeVar("Lab", bound=Namespaces)


@contextlib.contextmanager
def built(lab: Lab, build: Callable[[], None]) -> Iterator[Lab]:
    """Run ``build()``, yield the lab, and always tear it down (also if the build itself fails).

    A teardown error is raised if the body succeeded, and only warned about if the body raised, so it
    never hides the body's own failure.
    """
    try:
        build()
        yield lab
    except BaseException:
        for err in lab.close():
            warnings.warn(f"namespace teardown: {err}", RuntimeWarning, stacklevel=3)
        raise
    errors = lab.close()
    if errors:
        raise NetnsError("namespace teardown failed: " + "; ".join(errors))
