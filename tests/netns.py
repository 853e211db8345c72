"""A NAT lab in Linux network namespaces, for tests of relaying and hole punching.

Loopback tests can't show NAT behaviour: nothing drops unsolicited inbound packets and nothing
rewrites ports. This builds two home routers (MASQUERADE plus a stateful firewall) behind a small
"internet", with the namespace tools of ``simulations/netlab.py`` (which the testbed uses too).

Layout (namespace roles; real names are ``shl{pid}_{token}_{role}``)::

    pub 198.51.100.1 ─┐
                      ├─ br0 in "inet": router 198.51.100.254 + 203.0.113.254,
    nat1 198.51.100.2 ┤   ip_forward, `blackhole default` (unknown/private dests are dropped)
    nat2 203.0.113.2 ─┘
    nat1 lan 192.168.1.1/24 ── priv1 192.168.1.2
    nat2 lan 192.168.2.1/24 ── priv2 192.168.2.2

Each NAT namespace MASQUERADEs on ``wan`` (``--random-fully`` if ``random_ports``), forwards
LAN→WAN freely and WAN→LAN only for ESTABLISHED,RELATED, and drops unsolicited packets to its
own WAN address, so unsolicited connections time out instead of being refused.

Usage::

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with nat_lab() as lab:
        p = lab.popen(lab.priv1, [sys.executable, "-m", "shoal.node.cli", ...])
"""

from collections.abc import Iterator

from shoal.simulations.netlab import Namespaces, built, home_router_rules, new_prefix, unavailable_reason

__all__ = ["NatLab", "nat_lab", "unavailable_reason"]


class NatLab(Namespaces):
    """Names and addresses of the lab, built by :meth:`build`."""

    pub_ip = "198.51.100.1"
    nat1_wan_ip = "198.51.100.2"
    nat2_wan_ip = "203.0.113.2"
    priv1_ip = "192.168.1.2"
    priv2_ip = "192.168.2.2"
    nat1_lan_ip = "192.168.1.1"
    nat2_lan_ip = "192.168.2.1"

    def __init__(self, prefix: str, random_ports: bool) -> None:
        super().__init__(prefix)
        self.random_ports = random_ports
        self.inet, self.pub, self.nat1, self.nat2, self.priv1, self.priv2 = (
            prefix + role for role in ("inet", "pub", "nat1", "nat2", "priv1", "priv2")
        )

    def build(self) -> None:
        """Create every namespace, link, address, route, sysctl and firewall rule."""
        for role in ("inet", "pub", "nat1", "nat2", "priv1", "priv2"):
            self.add(role)
        inet = self.inet
        self.bridge(inet, "br0", "198.51.100.254/24", "203.0.113.254/24")
        # Bogon-style: anything not on the bridge (e.g. 192.168.x) vanishes, so it times out.
        self.link(inet, "route", "add", "blackhole", "default")
        # Routing between the two subnets re-uses br0; redirects would only confuse the hosts.
        self.sysctl(
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
            self.veth(inet, port, ns, wan)
            self.link(inet, "link", "set", port, "master", "br0", "up")
            self.link(ns, "addr", "add", f"{ip}/24", "dev", wan)
            self.link(ns, "link", "set", wan, "up")
            self.link(ns, "route", "add", "default", "via", gw)
        for nat, priv, lan_ip, priv_ip in (
            (self.nat1, self.priv1, self.nat1_lan_ip, self.priv1_ip),
            (self.nat2, self.priv2, self.nat2_lan_ip, self.priv2_ip),
        ):
            self.veth(nat, "lan", priv, "eth0")
            self.link(nat, "addr", "add", f"{lan_ip}/24", "dev", "lan")
            self.link(nat, "link", "set", "lan", "up")
            self.link(priv, "addr", "add", f"{priv_ip}/24", "dev", "eth0")
            self.link(priv, "link", "set", "eth0", "up")
            self.link(priv, "route", "add", "default", "via", lan_ip)
            self.sysctl(nat, {"net/ipv4/ip_forward": 1})
            self.firewall(nat, home_router_rules(self.random_ports))


def nat_lab(random_ports: bool = False) -> Iterator[NatLab]:
    """Build the lab, yield it, and always tear it down (``netlab.built``)."""
    lab = NatLab(new_prefix("shl"), random_ports)
    return built(lab, lab.build)
