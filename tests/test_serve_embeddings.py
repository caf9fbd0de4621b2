"""/v1/embeddings on an encoder: OpenAI's body (float and base64) with the vectors LLM.embed gives,
read by the official openai client; a decoder server refuses it, an encoder server refuses
generation, both as 400s naming the field."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch

from lmforge.infer.llm import LLM
from lmforge.serve.app import create_app
from lmforge.serve.config import ServerConfig
from lmforge.serve.embeddings import EmbeddingEngine

from reference_libs import reference_lib
from serve_fixtures import NAME, ServerThread, start_server, make_llm
from test_encoder_embed import hf_bert_folder

TEXTS = ["the cat sat on the mat", "a dog", "green happy movie plot " * 3]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    llm = LLM.load(hf_bert_folder(tmp_path_factory.mktemp("bert"), reference_lib("transformers")))
    srv = ServerThread(create_app(ServerConfig(served_model_name=NAME), engine=EmbeddingEngine(llm)))
    yield srv, llm
    srv.stop()


def test_embeddings_float_and_base64_equal_llm_embed(encoder):
    srv, llm = encoder
    expected = llm.embed(TEXTS).numpy()
    r = httpx.post(srv.url + "/v1/embeddings", json={"model": NAME, "input": TEXTS})
    assert r.status_code == 200
    body = r.json()
    assert (body["object"], body["model"], [d["index"] for d in body["data"]]) == ("list", NAME, [0, 1, 2])
    assert all(d["object"] == "embedding" for d in body["data"])
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert np.array_equal(got, expected)
    tokens = sum(len(ids) for ids in llm.tokenizer.encode_pairs(TEXTS)[0])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    r = httpx.post(srv.url + "/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(r["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(vec, expected[0])


def test_openai_client_reads_embeddings(encoder):
    srv, llm = encoder
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
    r = client.embeddings.create(model=NAME, input=TEXTS)  # the client asks for base64 and decodes it
    assert np.array_equal(np.array([d.embedding for d in r.data], dtype=np.float32), llm.embed(TEXTS).numpy())
    r = client.embeddings.create(model=NAME, input="a dog", encoding_format="float")
    assert np.allclose(r.data[0].embedding, llm.embed(["a dog"]).numpy()[0], atol=0, rtol=0)


@pytest.mark.parametrize("body,param,message", [
    ({"input": []}, "input", "input is empty"),
    ({"input": [1, 2, 3]}, "input", "this server embeds text; send input as a string or a list of strings, not "
                                    "token ids"),
    ({"input": "x", "dimensions": 7}, "dimensions", "dimensions 7 is not supported: this model's embeddings have 32"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", None),
])
def test_bad_embedding_requests(encoder, body, param, message):
    r = httpx.post(encoder[0].url + "/v1/embeddings", json=body)
    err = r.json()["error"]
    assert (r.status_code, err["param"]) == (400, param)
    if message:
        assert err["message"] == message


def test_wrong_route_for_the_model(encoder):
    r = httpx.post(encoder[0].url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "model")
    assert r.json()["error"]["message"] == ("/v1/chat/completions is not available for this model: it is an encoder "
                                            "model, served for /v1/embeddings")
    assert httpx.get(encoder[0].url + "/metrics").status_code == 200
    assert httpx.get(encoder[0].url + "/v1/models").json()["data"][0]["max_model_len"] == 64
    srv, _ = start_server(make_llm())
    try:
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": "x"})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "model")
        assert "it is a decoder that generates text; /v1/embeddings needs an encoder model" in r.json()["error"]["message"]
    finally:
        srv.stop()


def test_lmforge_serve_serves_an_encoder_for_embeddings(tmp_path):
    import os
    import subprocess
    import time

    from serve_fixtures import REPO, free_port, lmforge

    folder = hf_bert_folder(tmp_path, reference_lib("transformers"))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(lmforge("serve", str(folder), "--port", str(port)), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": TEXTS}, timeout=30).json()
        expected = LLM.load(folder).embed(TEXTS).numpy()
        assert np.allclose(np.array([d["embedding"] for d in r["data"]]), expected, atol=1e-6)
    finally:
        proc.terminate()
        proc.wait(20)
