"""Explicit context caching: the `/v1/caches` resources (the shape of Gemini's cachedContents
and Moonshot's context caching, in OpenAI style) and their lifetime on the TEs.

`POST /v1/caches` names a context (chat messages, or a completion prompt); the JE tokenizes it
(`JobExecutor.context_tokens`) and `create` builds it on a TE: a one-token task whose
`Add.pin` has the TE's RTC pin the prompt's full KV blocks under the cache's id
(`flowserve.rtc.RTC.pin`). The answer comes once those blocks are computed. The cluster's ID
index (`Cluster.pin_started`, `Cluster.holders`, next to the global prompt tree) records
which TE holds which cache, so dist_sched sends a request carrying `cache_id` there, and
that TE's RTC starts it from the pinned blocks (MatchByID).

A context lives until its TTL ends (`expire`, each second) or a DELETE: its TEs then unpin
it (`Cluster.unpin`), and its blocks fall back to ordinary prefix-cache blocks. A TE that
dies or retires takes its pins along: a context no TE holds any more is lost, and the same
once-a-second loop (`rebuild_lost`) builds it again from its stored tokens on another TE.
What contexts pin is bounded per TE by a budget, a fraction of the TE's KV blocks: a
context past it gets 507.

With a state dir (`state`), each context's metadata (its tokens, TTL) is kept there: after a
main-process restart, `restore` takes the contexts back; the re-adopted TEs said which ones
they still pin (`Cluster.adopt`), and a context none pins is rebuilt as above.
"""
import asyncio
import logging
import secrets
import time

from flowserve.protocol import FinishReason, SamplingParams
from scheduler.cluster import Cluster
from scheduler.job import Overloaded, Task
from scheduler.api import APIError, invalid
from scheduler.state import ContextCacheRow, StateStore, best_effort
from scheduler.te import TEHandle

log = logging.getLogger("deepflow.caches")

REBUILD_RETRY_S = 1.0


class ContextCache(ContextCacheRow):
    """A context cache: its row in the state dir (`kind`: the endpoint it prefixes; `context`:
    the messages or prompt as created; `blocks`: the full KV blocks it pins on a TE)."""

    @property
    def expires_at(self) -> float:
        return self.created + self.ttl_s

    def to_dict(self) -> dict:
        return {"id": self.id, "object": "context_cache", "model": self.model, "kind": self.kind,
                "tokens": len(self.token_ids), "created": int(self.created), "expires_at": int(self.expires_at)}


class ContextCaches:
    def __init__(self, cluster: Cluster, budget: float, state: StateStore | None = None):
        """`budget`: the fraction of a TE's KV blocks that contexts may pin; `state`: where
        contexts are kept for a restart."""
        self.cluster, self.budget, self.state = cluster, budget, state
        self.caches: dict[str, ContextCache] = {}
        self._building: dict[str, int] = {}  # cache id -> blocks, while its first build runs
        self.rebuilding: dict[str, asyncio.Task] = {}  # cache id -> its rebuild on another TE

    def get(self, cache_id: str, kind: str | None = None) -> ContextCache:
        """The live cache `cache_id` (404 if unknown or expired), for an endpoint of `kind`."""
        cache = self.caches.get(cache_id)
        if cache is None or cache.expires_at <= time.time():
            raise APIError(404, f"context cache '{cache_id}' does not exist or has expired", "cache_id",
                           code="cache_not_found")
        if kind and kind != cache.kind:
            other = "/v1/chat/completions" if cache.kind == "chat" else "/v1/completions"
            raise invalid(f"context cache '{cache_id}' holds a {cache.kind} context: use it with {other}", "cache_id")
        return cache

    async def create(self, model: str, kind: str, context, token_ids: list[int], ttl_s: int) -> ContextCache:
        """Build a context on the TE with the most pinning room and register it once its
        blocks are pinned; 507 past the budget, 429 at capacity."""
        bs = self.cluster.engine_cfgs[self.cluster.cache_group()].block_size
        cache = ContextCache("cache-" + secrets.token_hex(12), model, kind, context, token_ids, len(token_ids) // bs,
                             ttl_s, time.time())
        try:
            self.cluster.admit(1)
        except Overloaded as e:
            raise APIError(429, f"{e}; retry shortly") from e
        for _ in range(2):  # a TE that dies mid-build: once more, elsewhere
            if await self._build(cache, self._holder_for(cache)):
                self.caches[cache.id] = cache
                if self.state:
                    best_effort(self.state.insert, cache)
                return cache
        raise APIError(503, "the TEs building the context cache died; retry shortly")

    def delete(self, cache_id: str) -> None:
        self._drop(self.get(cache_id))

    def expire(self) -> None:
        now = time.time()
        for cache in [c for c in self.caches.values() if c.expires_at <= now]:
            log.info("context cache %s expired", cache.id)
            self._drop(cache)

    async def expire_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.expire()
            self.rebuild_lost()

    def pinned(self, te: TEHandle) -> int:
        """Blocks that contexts pin on `te` (or are being built to pin)."""
        return sum(self.caches[c].blocks if c in self.caches else self._building.get(c, 0)
                   for c in self.cluster.pins_on(te.id))

    def _holder_for(self, cache: ContextCache) -> TEHandle:
        tes = self.cluster.ready_tes(self.cluster.cache_group())
        if not tes:
            raise APIError(503, "no TE is ready to hold a context cache; retry shortly")
        allowed = {te.id: int(self.budget * te.stats.kv_blocks_total) for te in tes}
        room = {te.id: allowed[te.id] - self.pinned(te) for te in tes}
        if cache.blocks > max(allowed.values()):
            raise APIError(507, f"a context of {len(cache.token_ids)} tokens pins {cache.blocks} KV blocks; a TE may "
                                f"pin at most {max(allowed.values())} (--cache-budget {self.budget:g} of its KV cache)",
                           code="insufficient_storage")
        fits = [te for te in tes if room[te.id] >= cache.blocks]
        if not fits:
            raise APIError(507, f"the context caches' pinned-memory budget is full ({cache.blocks} more blocks do not "
                                f"fit on any TE); delete a cache or wait for one to expire", code="insufficient_storage")
        return max(fits, key=lambda te: (room[te.id], -te.load))

    async def _build(self, cache: ContextCache, te: TEHandle) -> bool:
        """Compute the context's prompt on `te` and pin it there; False if the TE died meanwhile."""
        task = Task(f"cache-{cache.id}", 0, cache.token_ids, SamplingParams(temperature=0, max_tokens=1,
                                                                           ignore_eos=True), pin=cache.id)
        self._building[cache.id] = cache.blocks
        self.cluster.pin_started(cache.id, te.id)
        try:
            te.submit(task)
            ev = await task.events.get()
        finally:
            self._building.pop(cache.id, None)
        if ev.finish_reason is FinishReason.ERROR:
            self.cluster.pin_dropped(cache.id, te.id)
            if ev.engine_lost:
                return False
            raise APIError(400, ev.error or "the TE refused the context")
        log.info("context cache %s: %d tokens pinned on %s", cache.id, len(cache.token_ids), te.id)
        return True

    def restore(self, model: str) -> None:
        """After a restart (and `Cluster.adopt`): the contexts of `model` the state dir keeps.
        A pin that no context claims any more (deleted, or its build cut by the crash) is dropped."""
        self.caches.update((c.id, c) for c in self.state.select(ContextCache, "model = ?", (model,)))
        for cache_id in [c for c in self.cluster.id_index if c not in self.caches]:
            self.cluster.unpin(cache_id)
        self.expire()

    def _drop(self, cache: ContextCache) -> None:
        if self.state:
            best_effort(self.state.delete, ContextCache, cache.id)
        self.caches.pop(cache.id, None)
        if rebuilding := self.rebuilding.pop(cache.id, None):
            rebuilding.cancel()
        self.cluster.unpin(cache.id)

    def rebuild_lost(self) -> None:
        """Build again, elsewhere, the contexts whose last TE is gone."""
        for cache in self.caches.values():
            rebuilding = self.rebuilding.get(cache.id)
            if self.cluster.holders(cache.id) or self.cluster.closing or (rebuilding and not rebuilding.done()):
                continue
            log.warning("context cache %s lost with its TE: rebuilding it", cache.id)
            self.rebuilding[cache.id] = asyncio.create_task(self._rebuild(cache))

    async def _rebuild(self, cache: ContextCache) -> None:
        while self.caches.get(cache.id) is cache:
            try:
                if await self._build(cache, self._holder_for(cache)):
                    return
            except APIError as e:  # no TE yet (a replacement is starting), or no room now
                log.info("context cache %s not rebuilt yet: %s", cache.id, e.message)
            await asyncio.sleep(REBUILD_RETRY_S)

    def to_dict(self) -> list[dict]:
        return [{**c.to_dict(), "holders": sorted(self.cluster.holders(c.id))} for c in self.caches.values()]
