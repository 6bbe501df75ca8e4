"""Endpoint pools: the runtime state of one route's endpoints, and choosing one.

State rules (one ``Pool`` per (service, route); one ``Host`` per ``Endpoint.key``):

- ``Host.health`` is a bitmask written by two sources: active health checks set
  ``FAILED_ACTIVE_HC``, passive outlier detection sets ``EJECTED``.  0 = healthy.
- A host is *live* when it is not draining (``endpoint.state == "draining"`` or
  no longer listed).  Draining hosts never get new connections; a draining host
  stays in ``hosts`` while the table still lists it.
- A host is *usable* when it is live and healthy.  Panic: when fewer than
  ``panic_threshold`` % of the live hosts are healthy, every live host is usable
  (better to try a maybe-broken endpoint than to refuse everything).
  ``panic_threshold`` 0 turns panic mode off.
- Locality ("prefer"): when some local (``via is None``) host is usable, choose
  among the local usable hosts only; otherwise spill to the remote ones.  When a
  connection has excluded every local host (retries), it spills too, and so does
  a new connection while the local hosts carry more than ``SPILL_FACTOR`` x their
  weight-fair share of the pool's open connections (plus ``SPILL_SLACK`` each).  Panic mode
  ignores locality.
- The tuples of live/usable/preferred hosts are recomputed on every health,
  ejection, drain or table change -- never per connection.
- Outlier detection: ``consecutive_failures`` connect failures in a row eject a
  host for ``base_ejection_time`` x (its ejection count), capped at
  ``max_ejection_time``.  A success resets the consecutive count.  At most
  ``max_ejection_percent`` % of the live hosts are ejected at once, rounded
  down, but at least one when the percent is > 0 and there are >= 2 live hosts
  (so a two-host route with the default 50 % can still shed its broken half).
  A host over the threshold that may not be ejected keeps counting and is
  ejected at its next failure once the bound allows it.
- A host that joins a running pool (a new key in ``update()``: a scale-up, a
  rolling update's new task) is *never-connected* until its first successful
  connect (``report_success``).  Its ejections last at most
  ``NEW_HOST_EJECTION`` x its ejection count (capped by the usual time): a new
  replica dialled a moment before its application listens, or before the agent
  of its node knows it, is back within a second rather than out for
  ``base_ejection_time``.  A new host that keeps failing still backs off, by
  ``NEW_HOST_EJECTION`` per ejection up to ``max_ejection_time``.  The hosts a
  pool is created with count as connected (as in slow start).
- Last resort: when a connection's attempts failed and no usable host is left
  to retry on, ``last_resort`` offers a live host it has not tried that is
  ejected (or failing active checks), so two flapping endpoints fail a client
  only when both fail it (unless panic is off: ``panic_threshold`` 0).
- Ejections expire lazily: ``choose()`` compares the clock with the earliest
  expiry (one float compare on the common path) and un-ejects what is due.
- The ejection count decays: it is halved for every full ``max_ejection_time``
  a host has spent un-ejected since its last ejection ended (applied lazily, at
  its next ejection), so a host that failed once a week ago starts again at the
  base time while a flapping host keeps backing off.
- ``update()`` diffs by ``Endpoint.key``: a host that is still listed keeps its
  active count, health, ejections and stats; weight and state changes apply in
  place; hosts no longer listed are marked draining and dropped from ``hosts``
  (open connections keep the object alive).
- Slow start (``slow_start`` seconds, 0 = off; Envoy's ``slow_start_config``,
  HAProxy's ``slowstart``): a host *ramps* when it joins (a new key in
  ``update()``, or a listed host that stops draining) or recovers (its ejection
  expired, or active checks call it healthy again), once it is fully healthy.
  The hosts a pool is created with start at full weight.  While a host ramps,
  its *factor* grows linearly from ``SLOW_START_MIN`` (10 %) at the start to 1
  at ``slow_start`` seconds.  The rule, applied to whatever ``choose()`` would
  return: a ramping host is kept with probability ``factor`` (one draw of the
  pool's rng), otherwise the selection runs once more with that host excluded
  (``Balancer.repick``: spread by weight, not handed to the host after it in a
  schedule) and its answer is taken, a ramping host too, without another draw;
  when nothing else is left, the ramping host is kept (slow start never
  refuses).  So round robin and p2c (and least-conn over idle hosts) give it
  ``factor`` x its full share of new connections, the rest spread over the
  others by weight; under load, least-conn gives it ``factor`` of the
  connections it would get as the least loaded host (a new host always is: this
  is where a ramp matters most).  ``hash`` does not ramp: moving some of a
  host's clients elsewhere, some of the time, would break the affinity that is
  the reason to choose it (Envoy offers slow start for round robin and least
  request only); its ejected or new host gets exactly its clients at once.
  Cost: one dict truth test per ``choose()`` while nothing ramps; while
  something does, one dict lookup, and a clock read and a draw only when a
  ramping host was chosen.  Ramps are kept in the pool (``Host`` has slots);
  the ones that ended are dropped lazily.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection

from mesh.balancer import Balancer, make_balancer
from mesh.host import EJECTED, FAILED_ACTIVE_HC, HEALTHY, Host
from mesh.routing import Route, ServiceOptions
from mesh.stats import RouteStats

__all__ = ["EJECTED", "FAILED_ACTIVE_HC", "HEALTHY", "NEW_HOST_EJECTION", "SLOW_START_MIN", "Host", "Pool"]

log = logging.getLogger(__name__)

_INF = float("inf")

# Locality spill-over (see Pool._local_overloaded): local hosts may carry up to twice their
# weight-fair share of this pool's open connections, plus 8 per unit of weight, before new
# connections spill to the least loaded remote host.
SPILL_FACTOR = 2.0
SPILL_SLACK = 8

# A never-connected host's ejection time per ejection (module docstring).
NEW_HOST_EJECTION = 1.0

# Slow start: a ramping host's factor at the start of its ramp (it grows linearly to 1).
SLOW_START_MIN = 0.1


class Pool:
    """The hosts of one (service, route) and the balancer that chooses among them.  See the module docstring."""

    def __init__(
        self,
        service: str,
        route: Route,
        options: ServiceOptions,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        local_node: str | None = None,
    ) -> None:
        self.service = service
        self.route = route
        self.options = options
        self.local_node = local_node
        self.stats = RouteStats()
        self.on_change: list[Callable[[Pool], None]] = []
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._balancer: Balancer = make_balancer(options.balance, self._rng)
        self._by_key: dict[tuple, Host] = {}
        self.hosts: tuple[Host, ...] = ()
        self._live: tuple[Host, ...] = ()  # not draining
        self._usable: tuple[Host, ...] = ()  # live and healthy (all live in panic)
        self._preferred: tuple[Host, ...] = ()  # what choose() balances over
        self._preferred_weight = 0
        self._usable_weight = 0
        self._panic = False
        self._next_expiry = _INF
        self._ramp: dict[Host, float] = {}  # slow start: ramping host -> when its ramp began (pool clock)
        self._ramp_end = 0.0  # when the last ramp ends
        self._sync_hosts(route, ramp=False)  # the hosts a pool starts with are at full weight
        self._balancer.set_universe(self.hosts)
        self._recompute(notify=False)

    # -- properties ---------------------------------------------------------------------
    @property
    def clock(self) -> Callable[[], float]:
        """The clock ejection times are measured on (``time.monotonic`` unless injected)."""
        return self._clock

    @property
    def port(self) -> int:
        return self.route.port

    @property
    def panic(self) -> bool:
        """True while too few hosts are healthy and every live host is used."""
        return self._panic

    @property
    def usable(self) -> tuple[Host, ...]:
        """Hosts that may get new connections (after panic, before locality)."""
        self._expire_due()
        return self._usable

    @property
    def healthy_count(self) -> int:
        self._expire_due()
        return sum(1 for h in self._live if not h.health)

    @property
    def balancer(self) -> Balancer:
        return self._balancer

    # -- the hot path ----------------------------------------------------------------------
    def choose(self, client: tuple[str, int] | None = None, exclude: Collection[Host] = ()) -> Host | None:
        """Pick a host for a new connection from ``client`` (``(ip, port)``, may be None).

        Never awaits.  ``exclude`` holds hosts this connection already tried.
        Returns None when no usable host remains after ``exclude`` (in panic mode
        every live host is usable).  A host in its slow-start ramp may be turned
        down for another (module docstring); slow start never makes it None.
        """
        if self._clock() >= self._next_expiry:
            self._expire_due()
        preferred = self._preferred
        if preferred is not self._usable and self._local_overloaded():
            host = self._least_loaded(exclude)
        else:
            host = self._balancer.pick(preferred, client, exclude)
            if host is None and exclude and preferred is not self._usable:
                # Every preferred (local) host was tried: spill to the least loaded of the rest.
                host = self._least_loaded(exclude)
        if self._ramp and host is not None:
            return self._slow_start(host, client, exclude)
        return host

    def _repick(self, client: tuple[str, int] | None, exclude: Collection[Host]) -> Host | None:
        """``choose()``'s selection once more, for slow start: ``exclude`` holds the turned-down host,
        and the balancer's ``repick`` spreads what it does not take (``mesh.balancer``)."""
        preferred = self._preferred
        if preferred is not self._usable and self._local_overloaded():
            return self._least_loaded(exclude)
        host = self._balancer.repick(preferred, client, exclude)
        if host is None and preferred is not self._usable:
            host = self._least_loaded(exclude)
        return host

    def _slow_start(self, host: Host, client: tuple[str, int] | None, exclude: Collection[Host]) -> Host:
        """The slow-start rule (module docstring) for a ``host`` that ``choose()`` selected."""
        ramp = self._ramp
        began = ramp.get(host)
        if began is None:
            return host
        now = self._clock()
        if now >= self._ramp_end:
            ramp.clear()  # every ramp has ended
            return host
        elapsed = now - began
        window = self.options.slow_start
        if elapsed >= window:
            del ramp[host]
            return host
        factor = SLOW_START_MIN + (1.0 - SLOW_START_MIN) * max(elapsed, 0.0) / window
        if self._rng.random() < factor:
            return host
        other = self._repick(client, (*exclude, host))
        if other is None:
            return host  # nothing else to send it to: slow start never refuses
        self.stats.slow_start_deferred += 1
        return other

    def slow_start_factor(self, host: Host) -> float:
        """Where ``host`` is in its slow-start ramp: ``SLOW_START_MIN`` .. 1.0 (1.0 = not ramping)."""
        began = self._ramp.get(host)
        window = self.options.slow_start
        if began is None or window <= 0:
            return 1.0
        elapsed = self._clock() - began
        if elapsed >= window:
            return 1.0
        return SLOW_START_MIN + (1.0 - SLOW_START_MIN) * max(elapsed, 0.0) / window

    @property
    def ramping(self) -> tuple[Host, ...]:
        """The hosts in their slow-start ramp now."""
        return tuple(h for h in self._ramp if self.slow_start_factor(h) < 1.0)

    def last_resort(self, exclude: Collection[Host]) -> Host | None:
        """For a connection whose attempts all failed and for which ``choose`` has nothing left: a live
        host it has not tried that is ejected or failing its health checks (ejected first: a passive
        verdict that may be stale; then the least loaded).  Better a maybe-broken endpoint than a
        refused client.  None with ``panic_threshold`` 0 (panic off: refusing is what was asked for)."""
        if self.options.panic_threshold == 0:
            return None
        best: Host | None = None
        best_key: tuple[bool, float] | None = None
        for h in self._live:
            if h in exclude or not h.health:
                continue
            key = (bool(h.health & FAILED_ACTIVE_HC), h.active / h.weight)
            if best_key is None or key < best_key:
                best, best_key = h, key
        return best

    def _local_overloaded(self) -> bool:
        """Locality spill-over: the local hosts carry more than their share of this pool's open
        connections, i.e. more than ``SPILL_FACTOR`` x what they would carry if the connections
        were spread over every usable host by weight, plus ``SPILL_SLACK`` per unit of weight (so a
        lightly loaded node always stays local).  O(hosts), and only with locality in effect."""
        local_active = 0
        for h in self._preferred:
            local_active += h.active
        if local_active < SPILL_SLACK * self._preferred_weight:
            return False
        total_active = 0
        for h in self._usable:
            total_active += h.active
        fair = total_active * self._preferred_weight / self._usable_weight
        return local_active > SPILL_FACTOR * fair + SPILL_SLACK * self._preferred_weight

    def _least_loaded(self, exclude: Collection[Host]) -> Host | None:
        """The usable host with the fewest open connections per weight, not in ``exclude``."""
        best = None
        for h in self._usable:
            if h not in exclude and (best is None or h.active * best.weight < best.active * h.weight):
                best = h
        return best

    def report_success(self, host: Host) -> None:
        """A connect to ``host`` succeeded: reset its consecutive failures."""
        host.consecutive_failures = 0
        host.connected = True

    def report_failure(self, host: Host) -> None:
        """A connect to ``host`` failed: count it, and eject the host when it reached
        ``consecutive_failures`` and ``max_ejection_percent`` allows."""
        host.consecutive_failures += 1
        opts = self.options
        if host.consecutive_failures < opts.consecutive_failures:
            return
        if self._by_key.get(host.key) is not host or host.draining:
            return  # no longer ours to eject; it gets no new connections anyway
        now = self._clock()
        self._expire_due(now)  # an expired ejection may be re-ejected; others free their slot
        if host.health & EJECTED or self._ejected_count() >= self._max_ejected():
            return
        if host.ejections and host.ejected_until > 0:
            healthy_for = now - host.ejected_until
            halvings = int(healthy_for // opts.max_ejection_time) if healthy_for > 0 else 0
            host.ejections >>= min(halvings, 63)
        host.ejections += 1
        duration = min(opts.base_ejection_time * host.ejections, opts.max_ejection_time)
        if not host.connected:
            duration = min(duration, NEW_HOST_EJECTION * host.ejections)
        host.ejected_until = now + duration
        host.health |= EJECTED
        host.consecutive_failures = 0
        host.stats.ejections += 1
        self._ramp.pop(host, None)  # its ramp starts again when it is back
        if host.ejected_until < self._next_expiry:
            self._next_expiry = host.ejected_until
        log.warning(
            "service %s port %d: ejected endpoint %s (%s) for %.1fs after %d connect failures in a row (ejection #%d%s)",
            self.service,
            self.port,
            host.endpoint.id,
            host.endpoint.hostport,
            duration,
            opts.consecutive_failures,
            host.ejections,
            "" if host.connected else ", never connected yet",
        )
        self._recompute()

    def set_active_health(self, host: Host, healthy: bool, reason: str = "") -> None:
        """Record an active health check verdict (after rise/fall); logs and recomputes on a flip only."""
        was = not host.health & FAILED_ACTIVE_HC
        if was == healthy:
            return
        if healthy:
            host.health &= ~FAILED_ACTIVE_HC
        else:
            host.health |= FAILED_ACTIVE_HC
        if self._by_key.get(host.key) is not host:
            return
        if not healthy:
            self._ramp.pop(host, None)
        elif not host.health:
            self._start_ramp(host, self._clock())  # recovered: slow start
        log.log(
            logging.INFO if healthy else logging.WARNING,
            "service %s port %d: endpoint %s (%s) is now %s by health check%s",
            self.service,
            self.port,
            host.endpoint.id,
            host.endpoint.hostport,
            "healthy" if healthy else "unhealthy",
            f": {reason}" if reason else "",
        )
        self._recompute()

    # -- table changes ----------------------------------------------------------------------
    def update(self, route: Route, options: ServiceOptions) -> None:
        """Apply a new version of this route: an in-place diff by ``Endpoint.key``.

        Surviving hosts keep active/health/ejection state and stats; removed ones
        are marked draining and dropped from ``hosts``.  A changed ``balance``
        builds a new balancer over the same hosts.
        """
        old_balance = self.options.balance
        self.route = route
        self.options = options
        if options.balance != old_balance:
            self._balancer = make_balancer(options.balance, self._rng)
        self._sync_hosts(route, ramp=True)
        self._balancer.set_universe(self.hosts)
        self._next_expiry = min((h.ejected_until for h in self.hosts if h.health & EJECTED), default=_INF)
        self._sync_ramps()
        self._recompute(force=True)

    def _sync_hosts(self, route: Route, *, ramp: bool) -> None:
        """Diff the hosts by key; with ``ramp``, a host that joins (new key, or no longer draining) ramps."""
        old = self._by_key
        new: dict[tuple, Host] = {}
        now = self._clock() if ramp and self.options.slow_start > 0 else None
        for ep in route.endpoints:
            host = old.get(ep.key)
            if host is None:
                host = Host(ep)
                host.connected = not ramp  # joined a running pool: never connected yet
                joined = True
            else:
                was_draining = host.draining
                host._set_endpoint(ep)
                joined = was_draining and not host.draining
            if now is not None and joined and not host.draining and not host.health:
                self._start_ramp(host, now)
            new[ep.key] = host
        for key, host in old.items():
            if key not in new:
                host.draining = True
        self._by_key = new
        self.hosts = tuple(new.values())

    def _start_ramp(self, host: Host, began: float) -> None:
        """``host`` joined or recovered at ``began``: slow start, unless it is off (or ``hash``)."""
        opts = self.options
        if opts.slow_start <= 0 or opts.balance == "hash":
            return
        self._ramp[host] = began
        end = began + opts.slow_start
        if end > self._ramp_end:
            self._ramp_end = end

    def _sync_ramps(self) -> None:
        """After an update: drop the ramps of hosts that left, are draining, or when slow start is off."""
        ramp = self._ramp
        if not ramp:
            return
        opts = self.options
        if opts.slow_start <= 0 or opts.balance == "hash":
            ramp.clear()
            return
        by_key = self._by_key
        for host in [h for h in ramp if by_key.get(h.key) is not h or h.draining]:
            del ramp[host]
        self._ramp_end = max(ramp.values(), default=0.0) + opts.slow_start

    # -- internals --------------------------------------------------------------------------
    def _max_ejected(self) -> int:
        pct = self.options.max_ejection_percent
        n = len(self._live)
        bound = n * pct // 100
        if pct > 0 and n >= 2 and bound < 1:
            bound = 1
        return bound

    def _ejected_count(self) -> int:
        return sum(1 for h in self._live if h.health & EJECTED)

    def _expire_due(self, now: float | None = None) -> None:
        if now is None:
            now = self._clock()
        if now < self._next_expiry:
            return
        nxt = _INF
        changed = False
        for host in self.hosts:
            if host.health & EJECTED:
                if host.ejected_until <= now:
                    host.health &= ~EJECTED
                    changed = True
                    if not host.health and not host.draining:
                        self._start_ramp(host, host.ejected_until)  # recovered: slow start from then
                    log.info(
                        "service %s port %d: endpoint %s (%s) back from ejection",
                        self.service,
                        self.port,
                        host.endpoint.id,
                        host.endpoint.hostport,
                    )
                elif host.ejected_until < nxt:
                    nxt = host.ejected_until
        self._next_expiry = nxt
        if changed:
            self._recompute()

    def _recompute(self, notify: bool = True, force: bool = False) -> None:
        live = tuple(h for h in self.hosts if not h.draining)
        healthy = tuple(h for h in live if not h.health)
        threshold = self.options.panic_threshold
        panic = bool(live) and len(healthy) * 100 < threshold * len(live)
        if panic and not self._panic:
            log.warning(
                "service %s port %d: panic mode, only %d of %d endpoints healthy; balancing over all of them",
                self.service,
                self.port,
                len(healthy),
                len(live),
            )
        elif self._panic and not panic:
            log.info("service %s port %d: panic mode over", self.service, self.port)
        usable = live if panic else healthy
        changed = force or usable != self._usable or panic != self._panic
        self._live = live
        self._panic = panic
        self._usable = usable
        self._preferred = self._prefer(usable)
        self._preferred_weight = sum(h.weight for h in self._preferred)
        self._usable_weight = sum(h.weight for h in usable)
        self._balancer.rebuild(self._preferred)
        if notify and changed:
            self._notify()

    def _prefer(self, usable: tuple[Host, ...]) -> tuple[Host, ...]:
        """The subset of ``usable`` that choose() balances over (locality).

        All local usable hosts if there is one, else every usable host; choose()
        spills past them when they carry more than their share (``_local_overloaded``).
        In panic mode locality is ignored (as Envoy does): ``usable`` then holds
        unhealthy hosts too, and preferring local ones could send everything to
        failing local replicas while a healthy remote one exists.
        """
        if self.options.locality != "prefer" or self._panic:
            return usable
        local = tuple(h for h in usable if h.local)
        if not local or len(local) == len(usable):
            return usable
        return local

    def _notify(self) -> None:
        for cb in list(self.on_change):
            try:
                cb(self)
            except Exception:
                log.exception("service %s port %d: on_change callback %r failed", self.service, self.port, cb)

    def __repr__(self) -> str:
        healthy = sum(1 for h in self._live if not h.health)
        return (
            f"<Pool {self.service}:{self.port} balance={self.options.balance} hosts={len(self.hosts)} "
            f"live={len(self._live)} healthy={healthy} usable={len(self._usable)} "
            f"preferred={len(self._preferred)}{' PANIC' if self._panic else ''}"
            f"{f' ramping={len(self.ramping)}' if self._ramp else ''}>"
        )
