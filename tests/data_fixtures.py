"""Test fixtures for the built-in data sets: stand-in archives and a pip that never reaches the network.

`FakePip` replaces `subprocess.run` in lmforge.data.fetch: it "downloads" a local file into pip's
`-d` directory and records every call, so a test can assert how often the registry was asked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path


def tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def pinned_to(pin, path: Path):
    """The pin with the sha256 of a stand-in file, so the stand-in passes verification."""
    return dataclasses.replace(pin, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


class FakePip:
    def __init__(self, file: Path | None = None, returncode: int = 0, stderr: str = ""):
        self.file, self.returncode, self.stderr = file, returncode, stderr
        self.calls: list[list[str]] = []

    def __call__(self, cmd, **kwargs):
        self.calls.append(list(cmd))
        if self.file is not None and self.returncode == 0:
            shutil.copyfile(self.file, Path(cmd[cmd.index("-d") + 1]) / self.file.name)
        return subprocess.CompletedProcess(cmd, self.returncode, "", self.stderr)


def no_network(*args, **kwargs):
    raise AssertionError("the registry must not be asked: the file is in the cache")
