"""MoDeST's view of the swarm: whom a node samples from, and whether a model's sender can hold its role.

Inputs: the members the overlay vouches for (:class:`~learning.protocol.Members`), which of them are
down (``PeerDown``, a failed send; any message from one clears it) and the answers to the sampler's
pings (``learning.sampling``). Outputs: a round's candidates (:meth:`View.candidates`, in the order of
``learning.sampling.order``), the selections that pick its first available ones (:meth:`View.select`),
and :meth:`View.implausible_role`, why a model's sender cannot be what its message claims (or None).
The round state machine (``learning.modest``) owns one and moves it. Departures from the paper, for
hostile or failing peers (docs/security.md):

- **Members, not views.** The candidates are the members the overlay vouches for (on libp2p the peers
  whose own signed metadata record is current), not a view piggy-backed on models: the paper's views
  are hearsay, with which any peer could add entries, mark others as gone or shift who ranks first. A
  member that appears is sampled only after our next model send (the paper's JOIN rule,
  :meth:`View.join`); one that disappears (it left, or its record expired) drops out at once. The
  paper's inactivity threshold is the records' expiry. A member is sampled only once it has answered a
  ping of ours (``learning.sampling``): identities cost nothing, and members that never answer must
  not keep rounds waiting.
- **Roles checked against a sample we compute ourselves.** An aggregated model of round k is taken
  only from one of the first ``aggregators + role_slack`` candidates of round k by our members (members
  we know to be down skipped, as the sender's availability filter skipped them) and only if we are among
  its first ``sample_size + role_slack``; a trained model tagged k+1 only from one of the first
  ``sample_size + role_slack`` of round k, and only if we are among the first ``aggregators +
  role_slack`` of round k+1. The slack covers members still spreading and hand-overs to later
  candidates (``learning.modest``, "Rounds that go on"). A model refused by this check costs its sender
  nothing (it may know members we do not yet).
- **Suspects.** Members whose aggregation came to nothing or whose aggregate we refused: the state
  machine adds one more aggregator beside each in its later hand-overs, and forgets those that leave.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from shoal.learning.messages import AggregatedModel, TrainedModel
from shoal.learning.modest_config import ModestConfig
from shoal.learning.protocol import Action
from shoal.learning.sampling import Sampler, order


class View:
    def __init__(self, me: str, peers: Iterable[str], config: ModestConfig) -> None:
        """``peers``: the members known at the start."""
        self.me = me
        self.members: set[str] = {me, *peers}  # whom we sample from
        self.appeared: set[str] = set()  # new members, sampled from after our next model send
        self.down: set[str] = set()  # members we know to be down, until we hear from them again
        self.suspects: set[str] = set()  # members whose aggregation came to nothing or was refused
        self.sampler = Sampler(me, config.ping_interval, config.ping_timeout)
        self._config = config

    def found(self, peers: frozenset[str]) -> None:
        """The members before we start: the swarm as we find it, all of it sampled from at once."""
        self.members = {self.me, *peers}

    def on_members(self, peers: frozenset[str], estimate: int, now: float) -> list[Action]:
        """The members changed while we run: newcomers wait for :meth:`join` (and are probed now, for
        round ``estimate``), those gone drop out of every selection at once."""
        gone = self.members - peers - {self.me}
        self.appeared = set(peers) - self.members
        self.members -= gone
        self.down &= self.members | self.appeared
        self.suspects &= self.members
        self.sampler.keep(self.members | self.appeared)
        actions = self.sampler.probe(estimate, self.appeared, now)
        for peer in gone:
            actions += self.sampler.unavailable(peer, now)
        return actions

    def unavailable(self, peer: str, now: float) -> list[Action]:
        """``peer`` went down or could not be sent to: the selections waiting for it move on."""
        if peer in self.members or peer in self.appeared:  # only members: ids cost nothing
            self.down.add(peer)
        return self.sampler.unavailable(peer, now)

    def join(self) -> None:
        """The JOIN rule, at each model send of ours: the members that appeared are sampled from now on."""
        self.members |= self.appeared
        self.appeared = set()

    def candidates(self) -> set[str]:
        """Whom we sample from: members not known to be down that answered our pings
        (``learning.sampling``: a member that never answers costs no round anything)."""
        return self._available(self.members)

    def _available(self, peers: set[str]) -> set[str]:
        """Those of ``peers`` not known to be down that answered our pings, and us."""
        return {p for p in peers - self.down if self.sampler.usable(p)} | {self.me}

    def select(
        self, rnd: int, wanted: int, then: Callable[[list[str]], list[Action]], now: float
    ) -> list[Action]:
        """Pick the first ``wanted`` available candidates of round ``rnd``, then ``then(them)``."""
        # members whose mute has passed are heard from again in the background, not in this selection
        probes = self.sampler.probe(rnd, self.members - self.down, now)
        candidates = order(self.candidates(), rnd)
        return [*probes, *self.sampler.select(rnd, wanted, candidates, then, now)]

    def implausible_role(self, peer: str, msg: AggregatedModel | TrainedModel) -> str | None:
        """Why ``peer`` cannot be sending us this model, by the sample of its round that we compute from
        our own members (those appearing included, those we know to be down or never heard from
        skipped, as the sender's own pings skipped them)."""
        members = self.members | self.appeared
        known = self._available(members)
        if peer in members:
            known.add(peer)  # it is evidently up
        c, k = self._config, msg.round

        def plausible(who: str, rnd: int, wanted: int) -> bool:
            return who in order(known, rnd)[: wanted + c.role_slack]

        if isinstance(msg, AggregatedModel):
            if not plausible(peer, k, c.aggregators):
                return f"aggregated model of round {k} from a peer that is no plausible aggregator of it"
            if not plausible(self.me, k, c.sample_size):
                return f"aggregated model of round {k} sent to us, no plausible trainer of it"
        else:
            if not plausible(peer, k - 1, c.sample_size):
                return f"trained model tagged {k} from a peer that is no plausible trainer of round {k - 1}"
            if not plausible(self.me, k, c.aggregators):
                return f"trained model tagged {k} sent to us, no plausible aggregator of round {k}"
        return None
