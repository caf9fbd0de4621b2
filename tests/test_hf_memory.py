"""Conversions stream: the peak memory of convert_to_hf / convert_from_hf stays near one copy of the
weights (in fact: the memory-mapped source pages plus one tensor), never two full copies.

Measured in a fresh subprocess as the growth of peak RSS (Linux /proc/self/status VmHWM, reset
through /proc/self/clear_refs) over the RSS just before the call. The mapped source file counts
in RSS as its pages are read, so an exact streaming conversion shows ~1x the weights; anything that
materialises a state dict on top of that shows >= 2x.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.checkpoint import write_model_dir
from lmforge.models.decoder import Decoder, config_from_preset

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")

CHILD = r"""
import gc, json, sys
from lmforge.interop import hf

def rss():
    d = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024

def peak_growth(fn):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before, _ = rss()
    fn()
    return rss()[1] - before

lm, work = sys.argv[1], sys.argv[2]
hf.convert_to_hf(lm, work + "/warmup", max_shard_size=1 << 20)  # first-call imports, not weights
to_hf = peak_growth(lambda: hf.convert_to_hf(lm, work + "/hf", max_shard_size=8 << 20))
from_hf = peak_growth(lambda: hf.convert_from_hf(work + "/hf", work + "/lm2"))
print(json.dumps({"to_hf": to_hf, "from_hf": from_hf}))
"""


def test_conversion_peak_memory_is_about_one_copy(tmp_path):
    cfg = config_from_preset(None, vocab_size=24000, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=256,
                             mlp_hidden=512, pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False,
                             tie_embeddings=False)
    model = Decoder(cfg)
    write_model_dir(tmp_path / "lm", model)
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert weight_bytes > 40e6  # big enough that interpreter noise does not matter
    del model
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "lm"), str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    growth = json.loads(res.stdout.strip().splitlines()[-1])
    for direction, grew in growth.items():
        assert grew < 1.4 * weight_bytes, \
            f"{direction}: peak RSS grew {grew / 1e6:.1f} MB for {weight_bytes / 1e6:.1f} MB of weights"
