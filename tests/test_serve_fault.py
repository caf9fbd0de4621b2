"""Fault test (bounded, loopback only): 32 concurrent clients mixing streams, plain requests,
disconnects mid-stream, malformed JSON, wrong types, oversize prompts and a full queue. Afterwards
the server is healthy, no response was a 500, every completed greedy reply equals the offline
result, every slot is free and memory is back near its level before the burst."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time

import httpx
import pytest

from serve_fixtures import make_llm, offline_ids, slow_down, start_server

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = "ROMEO: but soft, what light through yonder window breaks? hello world the quick brown fox".split()


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_fault_burst():
    llm = make_llm()
    tok = llm.tokenizer
    srv, engine = start_server(llm, max_batch=8, max_queue=6)
    slow_down(engine, 0.003)
    url = srv.url + "/v1/completions"
    prompts = [" ".join(WORDS[i % 9: i % 9 + 1 + i % 4]) for i in range(32)]
    statuses: list[int] = []
    greedy: dict[int, str] = {}

    async def client(i: int, http: httpx.AsyncClient) -> None:
        kind = i % 8
        body = {"prompt": prompts[i], "max_tokens": 16, "temperature": 0}
        if kind in (0, 1):  # full greedy stream
            async with http.stream("POST", url, json={**body, "stream": True}) as r:
                statuses.append(r.status_code)
                if r.status_code == 200:
                    text = ""
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            assert "error" not in chunk
                            text += "".join(c["text"] for c in chunk["choices"])
                    greedy[i] = text
        elif kind == 2:  # plain greedy request
            r = await http.post(url, json=body)
            statuses.append(r.status_code)
            if r.status_code == 200:
                greedy[i] = r.json()["choices"][0]["text"]
        elif kind == 3:  # disconnect mid-stream
            async with http.stream("POST", url, json={**body, "max_tokens": 100, "ignore_eos": True,
                                                      "stream": True}) as r:
                statuses.append(r.status_code)
                n = 0
                async for line in r.aiter_lines():
                    n += line.startswith("data: ")
                    if n == 3:
                        break
        elif kind == 4:  # malformed JSON / not an object / wrong types
            not_json = "the request body is not valid JSON: "  # then the parser's words
            bad = [(b'{"prompt": "hi", "max_tokens": 5', not_json, None),
                   (b'"just a string"', "the request body must be a JSON object", None),
                   (b"\xff\xfe\x00garbage", not_json, None),
                   (json.dumps({"prompt": {"a": 1}}).encode(),
                    "invalid value for 'prompt': Input should be a valid string", "prompt"),
                   (json.dumps({"prompt": "hi", "n": "2"}).encode(),
                    "invalid value for 'n': Input should be a valid integer", "n"),
                   (json.dumps({"prompt": "hi", "stop": [1, 2]}).encode(),
                    "invalid value for 'stop': Input should be a valid string", "stop")][i // 8 % 6:][:3]
            for b, message, param in bad:
                r = await http.post(url, content=b, headers={"content-type": "application/json"})
                statuses.append(r.status_code)
                err = r.json()["error"]
                assert r.status_code == 400 and err["message"].startswith(message), (b, err)
                assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, None)
        elif kind == 5:  # oversize prompt (ids beyond the context) and an oversize body
            r = await http.post(url, json={"prompt": list(range(5, 205)), "max_tokens": 4})
            statuses.append(r.status_code)
            assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
            if i == 5:
                r = await http.post(url, content=b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}',
                                    headers={"content-type": "application/json"})
                statuses.append(r.status_code)
                assert r.status_code == 413
        elif kind == 6:  # sampled chat streams (not compared; they just load the batch)
            r = await http.post(srv.url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": 20, "stream": True,
                "temperature": 1.0, "seed": i})
            statuses.append(r.status_code)
        else:  # nonsense that must not hurt: huge n, unknown route, wrong method
            for method, path, payload in (("POST", url, {"prompt": "x", "n": 100, "max_tokens": 100}),
                                          ("GET", srv.url + "/v1/nothing", None), ("GET", url, None)):
                r = await http.request(method, path, json=payload)
                statuses.append(r.status_code)
                assert r.status_code in (400, 404, 405, 429)

    async def burst() -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            await asyncio.wait_for(asyncio.gather(*(client(i, http) for i in range(32))), timeout=60)

    try:
        # a first burst warms allocator caches and buffers; memory is compared around the second
        asyncio.run(burst())
        statuses.clear()
        greedy.clear()
        gc.collect()
        before = rss_bytes()
        t0 = time.monotonic()
        asyncio.run(burst())
        elapsed = time.monotonic() - t0
        sched = engine.scheduler
        deadline = time.monotonic() + 10
        while (sched.num_running or sched.num_waiting) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sched.num_running == 0 and sched.num_waiting == 0
        assert httpx.get(srv.url + "/health").status_code == 200
        assert 500 not in statuses and all(s < 500 for s in statuses)
        assert 429 in statuses  # the queue bound was hit
        assert len(greedy) >= 4  # some greedy replies completed despite the full queue
        for i, text in greedy.items():
            expected = offline_ids(llm, tok.encode_prompt(prompts[i]), 16, temperature=0)
            assert text == tok.decode(expected, skip_special=True), i
        # the server still serves normally
        r = httpx.post(url, json={"prompt": prompts[0], "max_tokens": 16, "temperature": 0}, timeout=30)
        assert r.status_code == 200
        gc.collect()
        grown = rss_bytes() - before
        assert grown < 32 * 2**20, f"memory grew by {grown / 2**20:.1f} MiB"
        assert elapsed < 60
    finally:
        engine.scheduler.stop()
        srv.stop()
