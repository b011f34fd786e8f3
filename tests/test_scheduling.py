"""dist_sched over two TEs: requests that share a system prompt land on the TE that caches
it (and hit its prefix cache more often than round-robin would), and once that TE is busier
than the imbalance allows, new requests go to the other one; and each TE samples from its own
random stream."""
import contextlib

import aiohttp

from tests.server_util import Server, data_lines

PIRATE = "You are a pirate captain. Answer every question in pirate speak, with nautical words. " * 8
CHEF = "You are a French chef. Answer every question with a recipe and a culinary anecdote. " * 8


def chat(system: str, question: str, **extra) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 1, "temperature": 0, **extra}


async def run_sequence(policy: str) -> tuple[int, dict[str, set[str]]]:
    """Eight chats, two system prompts, one at a time: cached tokens in all, and where each prompt ran."""
    with Server("--num-tes", "2", "--policy", policy, "--max-model-len", "1024", "--kv-cache-gb", "0.1") as s:
        cached, where = 0, {"pirate": set(), "chef": set()}
        async with aiohttp.ClientSession() as http:
            for i, name in enumerate(["pirate", "pirate", "chef", "chef"] * 2):
                body = chat(PIRATE if name == "pirate" else CHEF, f"Question number {i}?")
                async with http.post(s.url + "/v1/chat/completions", json=body) as r:
                    cached += (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"]
                where[name].add(s.get("/admin/cluster")["recent_jobs"][0]["tasks"][0]["te"])
        return cached, where


async def test_locality_lands_on_the_cache_and_beats_round_robin():
    cached, where = await run_sequence("locality")
    assert len(where["pirate"]) == 1 and len(where["chef"]) == 1
    rr_cached, rr_where = await run_sequence("rr")
    assert len(rr_where["pirate"]) == 2  # round-robin computes each system prompt on both TEs
    assert cached > rr_cached > 0


async def test_saturated_te_sends_new_requests_elsewhere():
    with Server("--num-tes", "2", "--imbalance", "2", "--max-model-len", "1024", "--kv-cache-gb", "0.1") as s:
        async with aiohttp.ClientSession() as http, contextlib.AsyncExitStack() as streams:
            for i in range(4):
                r = await streams.enter_async_context(http.post(s.url + "/v1/chat/completions", json=chat(
                    PIRATE, f"Tell me a long story, number {i}.", max_tokens=400, ignore_eos=True, stream=True)))
                await data_lines(r, 2)  # the role chunk, then the first token: the prompt is cached
            tasks = [j["tasks"][0] for j in reversed(s.get("/admin/cluster")["recent_jobs"][:4])]
            holder = tasks[0]["te"]
            assert [t["te"] for t in tasks[:3]] == [holder] * 3  # loads 0-1, 0-2: balanced, locality wins
            assert tasks[1]["placement"]["policy"] == "locality" and tasks[1]["placement"]["matched_tokens"] > 0
            assert tasks[3]["te"] != holder  # loads 3-0: imbalanced, the least loaded wins
            assert tasks[3]["placement"]["policy"] == "load" and not tasks[3]["placement"]["balanced"]


async def test_tes_forked_from_one_template_sample_differently():
    """Unseeded requests on two TEs forked from the same template: not the same "random" tokens."""
    with Server("--num-tes", "2", "--policy", "rr", "--max-model-len", "512", "--kv-cache-gb", "0.05") as s:
        async with aiohttp.ClientSession() as http:
            answers, tes = [], []
            for _ in range(4):  # round-robin: TE a, TE b, TE a, TE b
                body = chat("You write random words.", "Write ten random words.", max_tokens=16, temperature=1.5)
                async with http.post(s.url + "/v1/chat/completions", json=body) as r:
                    answers.append((await r.json())["choices"][0]["message"]["content"])
                tes.append(s.get("/admin/cluster")["recent_jobs"][0]["tasks"][0]["te"])
        assert tes[0] != tes[1] and tes[:2] == tes[2:]
        assert answers[0] != answers[1] or answers[2] != answers[3], answers  # same step on each TE, other tokens
