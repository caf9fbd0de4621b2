"""The server as its own process (`lmforge.serve.serve`, what `lmforge serve MODEL` runs: loads in the
background until /health answers 200, one log line per request) and `lmforge chat --url` talking to it with the
same REPL as `lmforge chat MODEL`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmforge.checkpoint import write_model_dir
from serve_fixtures import REPO, free_port, lmforge, make_llm



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve_cli")
    llm = make_llm()
    llm.tokenizer.save(root / "tok.json")
    conf = json.dumps(llm.tokenizer.tokenizer_config()).encode()
    return write_model_dir(root / "tiny-chat", llm.model, root / "tok.json", extra_files={"tokenizer_config.json": conf})


def test_serve_process_and_chat_url(model_dir):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    code = "import sys; from lmforge.serve import serve; serve(sys.argv[1], port=int(sys.argv[2]), max_batch=4)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(model_dir), str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        models = httpx.get(url + "/v1/models").json()
        assert models["data"][0]["id"] == "tiny-chat"  # the folder name
        r = httpx.post(url + "/v1/chat/completions", json={
            "model": "tiny-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
            "temperature": 0}, timeout=30).json()
        reply = r["choices"][0]["message"]["content"]
        assert reply

        chat = subprocess.run(lmforge("chat", "--url", url, "--temperature", "0", "--max-new-tokens", "8"),
                              input="hello\n/exit\n", cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert chat.returncode == 0, chat.stderr
        assert "> " + reply + "\n" in chat.stdout  # the same greedy reply, streamed by the REPL
        bad = subprocess.run(lmforge("chat", "--url", f"http://127.0.0.1:{free_port()}"), input="", cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stderr.startswith("error: cannot reach http://127.0.0.1:")
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    # one log line per request; no prompt text without --log-prompts
    assert "POST /v1/chat/completions 200 prompt=" in err
    assert " stream done " in err  # the REPL streams; its line comes when the stream ends
    assert "hello" not in err
