"""Denoising objectives for encoder-decoders: T5 span corruption and BART text infilling +
sentence permutation (statistics, exact reconstruction, seeding), and pretraining in the one loop
with a bit-exact resume after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from lmforge.errors import LMForgeError
from lmforge.train.denoise import (collate, permute_sentences, random_spans_noise_mask, span_corrupt, text_infill,
                                   _rng)

from train_fixtures import killed_cli, synthetic_documents


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield  # one thread in-process, as in the killed subprocess: identical float reductions


def _spans(mask: np.ndarray) -> list[int]:
    lengths, run = [], 0
    for m in mask.tolist() + [False]:
        if m:
            run += 1
        elif run:
            lengths.append(run)
            run = 0
    return lengths


def test_span_corruption_statistics():
    L, lengths, first_noisy = 200, [], 0
    for i in range(300):
        mask = random_spans_noise_mask(L, 0.15, 3.0, _rng(0, i, 0))
        assert mask.sum() == 30  # round(200 * 0.15) noise tokens, always
        spans = _spans(mask)
        assert len(spans) == 10 and min(spans) >= 1  # round(30 / 3) spans, none empty
        first_noisy += bool(mask[0])
        lengths += spans
    assert first_noisy == 0  # T5: the window starts with non-noise
    assert np.mean(lengths) == 3.0
    # span lengths are a uniformly random composition of 30 into 10 positive parts: 1 + a
    # Bose-Einstein share of the other 20, variance n(k-1)(n+k) / (k^2 (k+1)) = 20*9*30 / 1100 = 4.91
    var = np.var(lengths)
    assert 4.2 < var < 5.6, var


def test_span_corruption_reconstructs_the_window_exactly():
    window = np.arange(100, 164)
    sentinels = [999 - i for i in range(20)]
    mask = random_spans_noise_mask(len(window), 0.15, 3.0, _rng(1, 2, 3))
    src, tgt = span_corrupt(window, mask, sentinels, eos=0)
    assert src[-1] == 0 and tgt[-1] == 0
    used = [t for t in src if t in sentinels]
    assert used == sentinels[:len(used)] == [t for t in tgt if t in sentinels]  # <extra_id_0>, 1, ... in order
    # put the spans back: every sentinel in the source is replaced by its target span
    spans, cur = {}, None
    for t in tgt[:-1]:
        if t in sentinels:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    rebuilt = [x for t in src[:-1] for x in (spans[t] if t in sentinels else [t])]
    assert rebuilt == window.tolist()
    assert len(src) + len(tgt) == len(window) + 2 * len(used) + 2
    with pytest.raises(LMForgeError, match="more noise spans than sentinels"):
        span_corrupt(window, mask, sentinels[:1], eos=0)


def test_text_infilling_statistics():
    MASK = 7
    covered, per_mask, inserts, n_masks = [], [], 0, 0
    for i in range(200):
        window = np.arange(100, 300)
        out = text_infill(window, 0.3, 3.0, MASK, _rng(5, i, 0))
        kept = [t for t in out if t != MASK]
        assert kept == sorted(kept) and set(kept) <= set(window.tolist())  # survivors keep their order
        missing = len(window) - len(kept)
        covered.append(missing / len(window))
        # group the dropped tokens into their spans: a gap in the kept ids is one span
        gaps = [b - a - 1 for a, b in zip([99] + kept, kept + [300]) if b - a > 1]
        per_mask += gaps
        n_masks += out.count(MASK)
        inserts += out.count(MASK) - len(gaps)
    assert np.mean(covered) == pytest.approx(0.3, abs=0.01)  # round(0.3 * 200) tokens masked
    # spans are Poisson(3) lengths (0-length spans become inserted masks; the last span is cut to fit)
    assert 2.6 < np.mean(per_mask) < 3.4, np.mean(per_mask)
    share_zero = inserts / n_masks
    assert 0.01 < share_zero < 0.12, share_zero  # P(Poisson(3) = 0) = e^-3 = 0.050
    assert math.exp(-3) == pytest.approx(0.0498, abs=1e-4)


def test_sentence_permutation_keeps_sentences_whole():
    # ids 1 and 2 end sentences
    ends = np.zeros(50, dtype=bool)
    ends[[1, 2]] = True
    window = np.array([10, 11, 1, 12, 13, 14, 2, 15, 1, 16, 17, 2])
    seen = set()
    for i in range(30):
        out = permute_sentences(window, ends, _rng(0, i, 0))
        parts = []
        cur = []
        for t in out.tolist():
            cur.append(t)
            if ends[t]:
                parts.append(tuple(cur))
                cur = []
        if cur:
            parts.append(tuple(cur))
        assert sorted(parts) == sorted([(10, 11, 1), (12, 13, 14, 2), (15, 1), (16, 17, 2)])
        seen.add(tuple(out.tolist()))
    assert len(seen) > 5  # really shuffled


def test_collate_teacher_forcing_inputs():
    b = collate([([5, 6, 0], [7, 8, 9, 0]), ([5, 0], [3, 0])], pad_id=1, start_id=1)
    assert b["input_ids"].tolist() == [[5, 6, 0], [5, 0, 1]]
    assert b["input_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert b["labels"].tolist() == [[7, 8, 9, 0], [3, 0, -100, -100]]
    assert b["decoder_input_ids"].tolist() == [[1, 7, 8, 9], [1, 3, 0, 1]]


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    from lmforge.data.prepare import prepare

    d = tmp_path_factory.mktemp("s2s")
    (d / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in synthetic_documents(20000, 0)))
    meta = prepare([str(d / "c.jsonl")], str(d / "data"), tokenizer="char", val_fraction=0.2, progress=False)
    return d / "data", meta["vocab_size"]


def _over(objective: str, preset: str, extra: list[str]) -> list[str]:
    return ["--train.objective", objective, "--model.preset", preset, "--train.max_steps", "6",
            "--train.micro_batch_size", "4", "--train.seq_len", "48", "--train.eval_every", "3", "--train.eval_iters", "1",
            "--train.ckpt_every", "3", "--train.progress", "false", "--train.lr", "3e-3", "--train.warmup_steps", "2",
            "--train.log_every", "1", *extra]


def test_span_corruption_trains_and_resumes_bit_exactly(char_data, tmp_path):
    from lmforge.train.pretrain import run_training

    data, V = char_data
    over = _over("span_corruption", "t5-tiny", ["--model.vocab_size", str(V + 16), "--objective.num_sentinels", "16"])
    full = run_training(str(data), str(tmp_path / "full"), overrides=over)
    assert full["steps"] == 6 and full["val_loss"] < math.log(V + 16)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(killed_cli(3, ["train", "--data", str(data), "--out", str(tmp_path / "part"), *over]),
                          env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_training(str(data), str(tmp_path / "part"), overrides=over, resume="auto")

    def losses(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert losses("full") == losses("part") and len(losses("full")) == 6
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "full/checkpoints/step_00000006/model.safetensors")
    wb = load_file(tmp_path / "part/checkpoints/step_00000006/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_text_infilling_trains_and_model_generates(char_data, tmp_path):
    from lmforge.infer.llm import LLM
    from lmforge.train.pretrain import run_training

    data, _ = char_data
    s = run_training(str(data), str(tmp_path / "bart"), overrides=_over("text_infilling", "bart-tiny", []))
    rows = [json.loads(x) for x in (tmp_path / "bart" / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if "loss" in r]
    assert s["steps"] == 6 and train[-1] < train[0]
    llm = LLM.load(tmp_path / "bart")
    out = llm.generate("The king <|mask|> land.", max_new_tokens=5, temperature=0)
    ids = llm.tokenizer.encode("The king <|mask|> land.", allow_special=True)  # the mask is the special token
    assert out == llm.tokenizer.decode(llm.generate(ids, max_new_tokens=5, temperature=0))
    assert out == " " * 5  # after 6 steps the model knows the commonest character only


def test_bad_setups_are_one_line_errors(char_data, tmp_path):
    from lmforge.train.pretrain import run_training

    data, V = char_data
    with pytest.raises(LMForgeError, match=rf"set --model.vocab_size {V + 100}"):
        run_training(str(data), str(tmp_path / "a"), overrides=_over("span_corruption", "t5-tiny", []))
    with pytest.raises(LMForgeError, match="model.eos_id is 1 but the data's tokenizer uses 0; set --model.eos_id 0"):
        run_training(str(data), str(tmp_path / "b"), overrides=_over("text_infilling", "bart-tiny",
                                                                      ["--model.eos_id", "1", "--model.pad_id", "2"]))
