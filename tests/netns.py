"""A NAT lab in Linux network namespaces, for tests of relaying and hole punching.

Loopback tests can't show NAT behaviour: nothing drops unsolicited inbound packets and
nothing rewrites ports. This helper builds two home routers (MASQUERADE plus a stateful
firewall) behind a small "internet", all in fresh namespaces so the host's own networking is
never touched: every veth is created directly inside its namespaces (`ip -n NS link add ...
peer ... netns OTHER`), never in the root namespace.

Layout (namespace roles; real names are ``shl{pid}_{token}_{role}``)::

    pub 198.51.100.1 ─┐
                      ├─ br0 in "inet": router 198.51.100.254 + 203.0.113.254,
    nat1 198.51.100.2 ┤   ip_forward, `blackhole default` (unknown/private dests are dropped)
    nat2 203.0.113.2 ─┘
    nat1 lan 192.168.1.1/24 ── priv1 192.168.1.2
    nat2 lan 192.168.2.1/24 ── priv2 192.168.2.2

Each NAT namespace MASQUERADEs on ``wan`` (``--random-fully`` if ``random_ports``), forwards
LAN→WAN freely and WAN→LAN only for ESTABLISHED,RELATED, and drops unsolicited packets to its
own WAN address, so unsolicited connections time out instead of being refused. Conntrack
INVALID packets are dropped rather than forwarded un-NATed.

Usage::

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with nat_lab() as lab:
        p = lab.popen(lab.priv1, [sys.executable, "-m", "shoal.node.cli", ...])
"""

import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

TIMEOUT = 10.0  # seconds for any one setup/teardown command
KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL at teardown
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


class NetnsError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def _which(name: str) -> str | None:
    """Like shutil.which, but also look in sbin: pytest may run with a user's PATH."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))


def _run(argv: Sequence[str], *, input: str | None = None, timeout: float = TIMEOUT) -> str:
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
    """Why the lab can't be built here (for pytest.skip), or None if it can.

    Probes for real, since containers often have the binaries but no CAP_NET_ADMIN or no
    netfilter NAT support: it creates a namespace, loads a MASQUERADE --random-fully rule in it,
    and deletes it again.
    """
    hint = "needs root, iproute2 and iptables (apt-get install iproute2 iptables)"
    if os.geteuid() != 0:
        return f"not root; {hint}"
    ip, ipt = _which("ip"), _which("iptables")
    missing = [n for n in ("ip", "iptables", "iptables-restore") if not _which(n)]
    if missing or not ip or not ipt:
        return f"missing {', '.join(missing)}; {hint}"
    probe = f"shl{os.getpid()}_{secrets.token_hex(2)}_probe"
    try:
        _run([ip, "netns", "add", probe])
    except NetnsError as e:
        return f"`ip netns add` failed ({e}); {hint}"
    try:
        rule = "-t nat -A POSTROUTING -o lo -j MASQUERADE --random-fully"
        _run([ip, "netns", "exec", probe, ipt, *rule.split()])
    except NetnsError as e:
        return f"iptables NAT doesn't work in a namespace ({e}); {hint}"
    finally:
        with contextlib.suppress(NetnsError):
            _run([ip, "netns", "del", probe])
    return None


def _kill_ns_pids(ip: str, ns: str) -> None:
    """SIGKILL whatever still runs in a lab namespace; otherwise it outlives `ip netns del`."""
    with contextlib.suppress(NetnsError):
        for pid in _run([ip, "netns", "pids", ns]).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


@dataclass
class NatLab:
    """Names and addresses of a built lab, plus helpers to run things inside it."""

    prefix: str
    random_ports: bool
    pub_ip: str = "198.51.100.1"
    nat1_wan_ip: str = "198.51.100.2"
    nat2_wan_ip: str = "203.0.113.2"
    priv1_ip: str = "192.168.1.2"
    priv2_ip: str = "192.168.2.2"
    nat1_lan_ip: str = "192.168.1.1"
    nat2_lan_ip: str = "192.168.2.1"
    created: list[str] = field(default_factory=list)  # namespaces, in creation order
    procs: list[subprocess.Popen] = field(default_factory=list)
    ip: str = "ip"
    iptables_restore: str = "iptables-restore"

    inet = property(lambda self: self.prefix + "inet", doc="the 'internet' router/bridge namespace")
    pub = property(lambda self: self.prefix + "pub", doc="public host (relay), pub_ip")
    nat1 = property(lambda self: self.prefix + "nat1", doc="NAT for priv1, WAN nat1_wan_ip")
    nat2 = property(lambda self: self.prefix + "nat2", doc="NAT for priv2, WAN nat2_wan_ip")
    priv1 = property(lambda self: self.prefix + "priv1", doc="private host behind nat1, priv1_ip")
    priv2 = property(lambda self: self.prefix + "priv2", doc="private host behind nat2, priv2_ip")

    def popen(self, ns: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start argv inside namespace ns; it is killed at teardown if still running.

        Defaults to a new session so teardown can kill the whole process group.
        """
        if ns not in self.created:
            raise ValueError(f"{ns!r} is not a namespace of this lab ({self.created})")
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen([self.ip, "netns", "exec", ns, *argv], **kw)
        self.procs.append(p)
        return p

    def run(self, ns: str, argv: Sequence[str], timeout: float = TIMEOUT) -> str:
        """Run argv inside ns to completion and return stdout (e.g. `iptables -L -v -n`)."""
        return _run([self.ip, "netns", "exec", ns, *argv], timeout=timeout)

    def _ip(self, ns: str, *args: str) -> None:
        _run([self.ip, "-n", ns, *args])

    def _sysctl(self, ns: str, settings: dict[str, int]) -> None:
        """Write /proc/sys/<key> inside ns; via sh because sysctl(8) (procps) may be missing."""
        script = "; ".join(f"echo {v} > /proc/sys/{k}" for k, v in settings.items())
        _run([self.ip, "netns", "exec", ns, "sh", "-ec", script])

    def _add_ns(self, ns: str) -> None:
        _run([self.ip, "netns", "add", ns])
        self.created.append(ns)
        self._ip(ns, "link", "set", "lo", "up")

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        """A veth pair created straight inside two namespaces; it never exists in the root one."""
        self._ip(ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b)

    def build(self) -> None:
        """Create every namespace, link, address, route, sysctl and firewall rule."""
        for ns in (self.inet, self.pub, self.nat1, self.nat2, self.priv1, self.priv2):
            self._add_ns(ns)
        inet = self.inet
        self._ip(inet, "link", "add", "br0", "type", "bridge")
        self._ip(inet, "addr", "add", "198.51.100.254/24", "dev", "br0")
        self._ip(inet, "addr", "add", "203.0.113.254/24", "dev", "br0")
        self._ip(inet, "link", "set", "br0", "up")
        # Bogon-style: anything not on the bridge (e.g. 192.168.x) vanishes, so it times out.
        self._ip(inet, "route", "add", "blackhole", "default")
        # Routing between the two subnets re-uses br0; redirects would only confuse the hosts.
        self._sysctl(
            inet,
            {
                "net/ipv4/ip_forward": 1,
                "net/ipv4/conf/all/send_redirects": 0,
                "net/ipv4/conf/br0/send_redirects": 0,
            },
        )
        for ns, wan, ip, gw in (
            (self.pub, "eth0", self.pub_ip, "198.51.100.254"),
            (self.nat1, "wan", self.nat1_wan_ip, "198.51.100.254"),
            (self.nat2, "wan", self.nat2_wan_ip, "203.0.113.254"),
        ):
            port = "to_" + ns.removeprefix(self.prefix)
            self._veth(inet, port, ns, wan)
            self._ip(inet, "link", "set", port, "master", "br0", "up")
            self._ip(ns, "addr", "add", f"{ip}/24", "dev", wan)
            self._ip(ns, "link", "set", wan, "up")
            self._ip(ns, "route", "add", "default", "via", gw)
        for nat, priv, lan_ip, priv_ip in (
            (self.nat1, self.priv1, self.nat1_lan_ip, self.priv1_ip),
            (self.nat2, self.priv2, self.nat2_lan_ip, self.priv2_ip),
        ):
            self._veth(nat, "lan", priv, "eth0")
            self._ip(nat, "addr", "add", f"{lan_ip}/24", "dev", "lan")
            self._ip(nat, "link", "set", "lan", "up")
            self._ip(priv, "addr", "add", f"{priv_ip}/24", "dev", "eth0")
            self._ip(priv, "link", "set", "eth0", "up")
            self._ip(priv, "route", "add", "default", "via", lan_ip)
            self._sysctl(nat, {"net/ipv4/ip_forward": 1})
            _run([self.ip, "netns", "exec", nat, self.iptables_restore], input=self._ruleset())

    def _ruleset(self) -> str:
        """Home-router rules, loaded atomically with iptables-restore."""
        random = " --random-fully" if self.random_ports else ""
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
            # forwarding it would leak a 192.168.x source onto the internet.
            "-A FORWARD -m conntrack --ctstate INVALID -j DROP\n"
            "-A FORWARD -i lan -o wan -j ACCEPT\n"
            "-A FORWARD -i wan -o lan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
            "COMMIT\n"
        )

    def close(self) -> list[str]:
        """Kill leftover processes, then delete every namespace created; return the errors.

        Processes go first: a namespace with a live process survives `ip netns del` unnamed.
        """
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
        for ns in reversed(self.created):
            _kill_ns_pids(self.ip, ns)
            try:
                _run([self.ip, "netns", "del", ns])
            except NetnsError as e:
                errors.append(str(e))
        self.created.clear()
        return errors


@contextlib.contextmanager
def nat_lab(random_ports: bool = False) -> Iterator[NatLab]:
    """Build the lab, yield it, and always tear it down (also if the build itself fails).

    A teardown error is raised if the body succeeded, and only warned about if the body raised,
    so it never hides the test's own failure.
    """
    ip, ipr = _which("ip"), _which("iptables-restore")
    if not ip or not ipr:
        raise NetnsError(f"missing ip or iptables-restore: {unavailable_reason()}")
    lab = NatLab(
        prefix=f"shl{os.getpid()}_{secrets.token_hex(2)}_",
        random_ports=random_ports,
        ip=ip,
        iptables_restore=ipr,
    )
    try:
        lab.build()
        yield lab
    except BaseException:
        for err in lab.close():
            warnings.warn(f"nat_lab teardown: {err}", RuntimeWarning, stacklevel=2)
        raise
    errors = lab.close()
    if errors:
        raise NetnsError("nat_lab teardown failed: " + "; ".join(errors))
