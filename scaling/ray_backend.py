"""`--backend ray`: the cluster's hosts are the nodes of a Ray cluster (main process side).

Ray is cluster plumbing here, nothing more: it finds the nodes, pins one node agent
(`scaling/node_agent.py`) to each, and tells us when an agent dies. `RayBackend` polls
`ray.nodes()`: a node that joins becomes a `Host` (its agent probed for cores and memory,
its template started, from the model's cache or, when that host's DRAM holds no weights,
streamed from a running TE: `HostPool.donor`; or its pre-warmed pool filled); a node that leaves, or an agent
that fails its ping, takes its TEs with it (`HostPool.remove_host`) and the groups refill elsewhere.
A lost node that Ray still lists as alive (its agent died, or its link was cut and came back)
is tried again at once, then after 1, 2, and every 4 s (`Lost`; a try begun while the node is
cut off goes through when the link heals): a new agent first kills what the old one
left there (`NodeAgent.reap`), then the node is a host again and short groups refill there. The
backend knows the cluster (scheduler/cluster.py) only as the `HostPool` it was given.

With an adoption grace, agents are detached actors named after their node, in a Ray
namespace of the state dir: a restarted main process finds each one again (`_adopt`),
with its running template and TEs, instead of creating it.

TEs of every host connect back to the main process's `TEListener` (`scaling/te_listener.py`,
on `--te-port`) with the secret made for that one start, which `launch` hands their agent.
Frames are msgspec-typed msgpack: nothing is unpickled from a peer.

Only `deepflow.serve` imports this module, and only with `--backend ray`.
"""
import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Protocol

import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from flowserve.config import EngineConfig, TELaunch
from flowserve.protocol import encode_config
from scaling.hosts import Host
from scaling.launch import ROOT, Launched
from scaling.node_agent import NodeAgent
from scaling.te_listener import HELLO_TIMEOUT_S, TEListener

log = logging.getLogger("deepflow.ray")
POLL_S = 1.0
RETRY_S = (0, 1, 2, 4)  # before each try to take a lost node back; the last repeats
ADOPT_TIMEOUT_S = 60  # a new agent's first answer (a Ray worker starting on a busy host), or reaping


def ray_namespace(state_dir: str) -> str:
    """The Ray namespace of a deployment (its state dir): where a restarted main process finds
    the detached node agents of the previous one."""
    return "deepflow-" + hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:12]


class HostPool(Protocol):
    """What the backend tells the cluster (hosts come and go), and asks it (a running TE's
    DistFlow weights address, if any, for a host whose DRAM lacks the weights)."""
    def add_host(self, host: Host) -> None: ...
    def remove_host(self, host: Host, why: str) -> None: ...
    def donor(self) -> str | None: ...


class RayNode:
    """The main process's handle on one node agent: the `node` of a Ray host."""

    def __init__(self, node_id: str, agent, listener: TEListener, pool: HostPool, info: dict):
        """`info`: what its agent's probe found (cores, memory, has_weights), and its address."""
        self.node_id, self.agent, self.listener, self.pool, self.info = node_id, agent, listener, pool, info
        self.template_pid: int | None = None
        self.weights_from: str | None = None   # the donor TE its template took the weights from

    async def start(self) -> None:
        """Start the host's template (from its DRAM cache, or streamed from a running TE) or
        its pool of pre-warmed TEs; an agent that outlived the previous main process has them."""
        if self.info["started"]:
            self.template_pid = self.info["template_pid"]
            return
        self.weights_from = None if self.info["has_weights"] else self.pool.donor()
        self.template_pid = await self.agent.start.remote(self.weights_from)
        log.info("node agent on %s ready (template pid %s), weights from %s", self.info["address"],
                 self.template_pid, self.weights_from or "this host's cache or model file")

    async def launch(self, te_id: str, cfg: EngineConfig, launch: TELaunch, weights_from: str | None) -> Launched:
        secret, arrived = self.listener.expect(te_id)
        try:
            pid, mode, fresh = await self.agent.launch.remote(te_id, encode_config(cfg), encode_config(launch),
                                                              self.listener.address, secret, weights_from)
            reader, writer, buf = await asyncio.wait_for(arrived, HELLO_TIMEOUT_S)
        except RayError as e:  # the agent died meanwhile: a TE that failed to start, as on one host
            raise RuntimeError(f"node agent on {self.info['address']}: {str(e).strip().splitlines()[-1]}") from None
        finally:
            self.listener.forget(te_id)
        return Launched(reader, writer, buf, pid, mode, fresh=fresh)

    def kill(self, pid: int) -> None:
        self.agent.kill.remote(pid)  # fire and forget: on a lost host nothing answers

    kill_stale = kill  # the agent kills only what it started

    async def stop(self) -> None:
        with contextlib.suppress(RayError, TimeoutError):
            await asyncio.wait_for(self.agent.shutdown.remote(), 10)
        ray.kill(self.agent)

    def to_dict(self) -> dict:
        return {"node_id": self.node_id[:12], "agent_pid": self.info["pid"], "template_pid": self.template_pid,
                "weights_from": self.weights_from or "cache"}


@dataclass
class Lost:
    """A node whose host was lost while Ray still lists it: when to try it again."""
    tries: int = 0
    next_try: float = 0.0

    def failed(self) -> None:
        self.next_try = time.monotonic() + RETRY_S[min(self.tries, len(RETRY_S) - 1)]
        self.tries += 1


class RayBackend:
    def __init__(self, pool: HostPool, address: str, model_path: str, start_mode: str, prewarmed: int,
                 pool_cfg: EngineConfig, health_timeout_s: float, listener: TEListener, env: dict,
                 grace_s: float, namespace: str):
        """`pool`: where hosts go (the cluster); `start_mode`, `prewarmed`, `pool_cfg`: how each
        host's agent starts TEs; `health_timeout_s`: an agent silent this long loses its host;
        `listener`: where TEs connect (started); `env`: the TEs' DistFlow secret; `grace_s`:
        how long agents outlive the main process (0: not at all), in Ray `namespace`."""
        self.pool, self.address, self.model_path = pool, address, model_path
        self.start_mode, self.prewarmed, self.pool_cfg = start_mode, prewarmed, pool_cfg
        self.health_timeout_s, self.env, self.listener = health_timeout_s, env, listener
        self.grace_s, self.namespace = grace_s, namespace
        self.nodes: dict[str, Host] = {}
        self.lost: dict[str, Lost] = {}
        self.adopting: dict[str, asyncio.Task] = {}
        self.agent_ids = itertools.count()  # a lost node's old agent may keep its name a while
        self.watchers: list[asyncio.Task] = []

    async def start(self) -> None:
        # Agents import the project from its checkout, at the same path on every host.
        ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False, namespace=self.namespace,
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
        log.info("Ray cluster at %s; TEs connect to %s", self.address, self.listener.address)
        # The cluster starts the first hosts' agents itself.
        await asyncio.gather(*self.discover(await asyncio.to_thread(ray.nodes), start_nodes=False))
        if not self.nodes:
            raise RuntimeError("the Ray cluster has no live node")
        self.watchers = [asyncio.create_task(self.watch_agents()), asyncio.create_task(self.watch_nodes())]

    def discover(self, nodes: list[dict], start_nodes: bool = True) -> list[asyncio.Task]:
        """From `ray.nodes()`: adopt nodes that joined, and lost ones due for another try; drop
        hosts whose node left. Returns the adoptions under way."""
        alive = {n["NodeID"]: n for n in nodes if n["Alive"]}
        for node_id in list(self.nodes):
            if node_id not in alive:
                self._lose(node_id, "its Ray node left the cluster")
        for node_id in [n for n in self.lost if n not in alive]:  # gone for good: a raylet restarted is a new node
            del self.lost[node_id]
        now = time.monotonic()
        for node_id, node in alive.items():
            if node_id not in self.nodes and node_id not in self.adopting and \
                    (node_id not in self.lost or self.lost[node_id].next_try <= now):
                self.adopting[node_id] = asyncio.create_task(self._adopt(node, start_nodes))
        return list(self.adopting.values())

    async def _adopt(self, node: dict, start: bool) -> None:
        node_id, address = node["NodeID"], node["NodeManagerAddress"]
        # With a grace, one name per node: a restarted main process finds the agent that outlived
        # the last one (never a lost host's: that one was killed).
        name = f"deepflow-agent-{node_id[:12]}" + ("" if self.grace_s else f"-{os.getpid()}-{next(self.agent_ids)}")
        try:
            agent = ray.get_actor(name) if self.grace_s and node_id not in self.lost else None
        except ValueError:
            agent = None
        try:
            if agent is None:
                agent = ray.remote(NodeAgent).options(
                    num_cpus=0, max_restarts=0, name=name, lifetime="detached" if self.grace_s else None,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                ).remote(self.model_path, sys.executable, self.env, self.start_mode, self.prewarmed,
                         encode_config(self.pool_cfg), self.grace_s)
            # Begun while a node is cut off, it goes through once the link is back.
            info = {**await asyncio.wait_for(agent.probe.remote(), ADOPT_TIMEOUT_S), "address": address}
            if node_id in self.lost:  # an agent of ours ran there: its TEs, template and pool go first
                await asyncio.wait_for(agent.reap.remote(), ADOPT_TIMEOUT_S)
            ray_node = RayNode(node_id, agent, self.listener, self.pool, info)
            if start:
                await ray_node.start()
        except (RayError, TimeoutError, ValueError) as e:  # ValueError: the old agent's name is not free yet
            log.error("node %s (%s) could not be adopted: %s", node_id[:12], address, type(e).__name__)
            self.lost.setdefault(node_id, Lost()).failed()
            if agent:
                ray.kill(agent)
            return
        finally:
            del self.adopting[node_id]
        if self.lost.pop(node_id, None):
            log.warning("node %s (%s) is a host again", node_id[:12], address)
        taken = {h.name for h in self.nodes.values()}  # Ray's own test clusters put every node on one IP
        name = address if address not in taken else f"{address}/{node_id[:6]}"
        host = Host(name, address, info["cores"], info["memory"], ray_node)
        self.nodes[node_id] = host
        self.pool.add_host(host)

    def _lose(self, node_id: str, why: str) -> None:
        host = self.nodes.pop(node_id)
        self.lost[node_id] = Lost()
        self.lost[node_id].failed()
        self.pool.remove_host(host, why)
        with contextlib.suppress(RayError):
            ray.kill(host.node.agent)

    async def watch_agents(self) -> None:
        """Each second, ping every agent: one that fails, or stays silent past the
        health bound, loses its host."""
        while True:
            await asyncio.sleep(POLL_S)
            hosts = list(self.nodes.items())
            answers = await asyncio.gather(
                *(asyncio.wait_for(host.node.agent.ping.remote(), self.health_timeout_s) for _, host in hosts),
                return_exceptions=True)
            for (node_id, _), answer in zip(hosts, answers):
                if isinstance(answer, (RayError, TimeoutError)) and node_id in self.nodes:
                    self._lose(node_id, f"its node agent failed: {type(answer).__name__}")

    async def watch_nodes(self) -> None:
        """Every few seconds, or each second while a node is lost, look for nodes that came or went."""
        while True:
            await asyncio.sleep(POLL_S if self.lost else 3 * POLL_S)
            try:
                self.discover(await asyncio.to_thread(ray.nodes))
            except RayError as e:
                log.warning("could not list Ray nodes: %s", e)

    async def stop(self) -> None:
        """After the cluster's shutdown, which stopped the agents of the hosts it had."""
        for task in [*self.watchers, *self.adopting.values()]:
            task.cancel()
        await asyncio.to_thread(ray.shutdown)
