"""`lmforge serve` on the command line: one-line user errors with exit status 2 (a missing model, a
folder that is not a model, a taken port); loopback detection for the no-API-key warning."""

from __future__ import annotations

import os
import socket
import subprocess

from lmforge.serve import _is_loopback
from serve_fixtures import REPO, free_port, lmforge


def test_serve_user_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(lmforge("serve", str(tmp_path / "missing")), cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == f"error: model not found: {tmp_path / 'missing'}\n"
    # a folder that is not a model: the server stops with the loader's one-line error
    (tmp_path / "empty").mkdir()
    r = subprocess.run(lmforge("serve", str(tmp_path / "empty"), "--port", str(free_port())), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
    # a port already taken
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(lmforge("serve", str(tmp_path / "empty"), "--port", str(port)), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5")
