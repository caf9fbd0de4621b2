"""Report section 2, memorisation: canaries in prepared data, extraction and membership inference on
a tiny decoder over-fit to a few documents (vs the same model untrained), ROC AUC against
scikit-learn, and canary exposure against a hand-computed rank."""

from __future__ import annotations

import itertools
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference_libs import reference_lib
from lmforge.cli import main
from lmforge.data import TokenData
from lmforge.data.canaries import CANARY_TEMPLATE
from lmforge.data.prepare import prepare
from lmforge.errors import LMForgeError
from lmforge.eval.report import memorisation
from lmforge.eval.report.context import ReportContext
from lmforge.infer.llm import LLM
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import Encoder, config_from_preset

WORDS = "the king and queen of a far land rode out to see what night would bring them now".split()
OPTIONS = {"extraction_samples": 32, "membership_samples": 64, "membership_window": 32, "prefix_tokens": 16,
           "suffix_tokens": 16, "canary_candidates": 512}


def write_docs(folder: Path, n: int = 8, words: int = 30) -> Path:
    folder.mkdir()
    for i in range(n):
        rng = random.Random(i)
        (folder / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)) + "\n")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 documents of 30 random words, half held out; 2 canaries, inserted once and 16 times."""
    root = tmp_path_factory.mktemp("mem")
    out = root / "data"
    prepare([str(write_docs(root / "docs"))], str(out), tokenizer="char", val_fraction=0.5, progress=False,
            canaries=2, canary_repeats=[1, 16])
    return out


def overfit(data: Path, steps: int) -> LLM:
    td = TokenData(data)
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=td.vocab_size, block_size=96, n_layer=2, n_head=4, n_embd=64)
    model = Decoder(cfg)
    train = torch.from_numpy(np.asarray(td.split("train"), dtype=np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.stack([train[i:i + 49] for i in torch.randint(len(train) - 49, (16,), generator=g)])
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return LLM(model.eval(), cfg, td.tokenizer())


@pytest.fixture(scope="module")
def trained(data):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield overfit(data, 300)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def untrained(data):
    return overfit(data, 0)


def report(llm: LLM, data: Path | None, tmp_path: Path, **options) -> dict:
    ctx = ReportContext(llm=llm, data=data, out=tmp_path, options={**OPTIONS, **options},
                        generator=torch.Generator().manual_seed(0))
    return memorisation.run(ctx)


# ---- canaries in prepared data ------------------------------------------------------------------

def test_canaries_are_inserted_into_train_only_and_recorded(data):
    td = TokenData(data)
    plan = td.meta["canaries"]
    assert plan["template"] == CANARY_TEMPLATE and plan["alphabet"] == "0123456789" and plan["length"] == 6
    assert [s["repeats"] for s in plan["secrets"]] == [1, 16]
    tok = td.tokenizer()
    train, val = tok.decode(td.split("train").tolist()), tok.decode(td.split("val").tolist())
    for s in plan["secrets"]:
        assert train.count(CANARY_TEMPLATE.format(secret=s["secret"]) + "<|endoftext|>") == s["repeats"]
        assert s["secret"] not in val
    assert "<|unk|>" not in train  # the char vocabulary holds every digit
    assert td.documents("train") == 4 and td.split("train")[-1] == td.eos_id


def test_prepare_cli_canary_flags(tmp_path, capsys):
    docs = write_docs(tmp_path / "docs", n=3, words=20)
    assert main(["prepare", str(docs), "--out", str(tmp_path / "d"), "--tokenizer", "char", "--quiet",
                 "--canaries", "3", "--canary-repeats", "2"]) == 0
    plan = TokenData(tmp_path / "d").meta["canaries"]
    assert [s["repeats"] for s in plan["secrets"]] == [2, 2, 2] and len({s["secret"] for s in plan["secrets"]}) == 3
    with pytest.raises(SystemExit):
        main(["prepare", str(docs), "--out", str(tmp_path / "e"), "--canaries", "1", "--canary-repeats", "0"])
    assert "--canary-repeats: expected a positive integer, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prepare", str(docs), "--out", str(tmp_path / "e"), "--canaries", "-2"])
    assert "--canaries: expected a non-negative integer, got '-2'" in capsys.readouterr().err
    with pytest.raises(LMForgeError, match="--canary-repeats must be positive integers"):
        prepare([str(docs)], str(tmp_path / "f"), canaries=1, canary_repeats=[], progress=False)


# ---- ROC AUC ------------------------------------------------------------------------------------

def test_roc_auc_and_curve_equal_scikit_learn():
    metrics = reference_lib("sklearn.metrics")
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, 300).astype(float)  # many ties
    labels = (rng.random(300) < 0.4).astype(int)
    assert memorisation.roc_auc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr = memorisation.roc_curve(scores, labels)
    ref_fpr, ref_tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)


# ---- extraction and membership inference --------------------------------------------------------

def test_an_overfit_model_leaks_and_an_untrained_one_does_not(data, trained, untrained, tmp_path):
    hot = report(trained, data, tmp_path)
    assert hot["applies"] and hot["extraction"]["train"]["n"] == 32 and hot["membership"]["n_heldout"] == 64
    assert hot["extraction_rate_train"] >= 0.3 and hot["extraction_rate_heldout"] == 0.0
    assert hot["membership_auc"] > 0.95 and hot["membership"]["attacks"]["zlib"]["auc"] > 0.95
    cold = report(untrained, data, tmp_path)
    assert cold["extraction_rate_train"] == 0.0 and cold["extraction_rate_heldout"] == 0.0
    assert 0.3 < cold["membership_auc"] < 0.7
    # the reference attack with the model itself as reference: every score 0, AUC exactly 0.5
    same = report(trained, data, tmp_path, reference_model=trained)
    assert same["membership"]["attacks"]["reference"]["auc"] == 0.5
    page = memorisation.html(hot)
    assert "<h3>Membership inference</h3>" in page and "data:image/png;base64," in page and "<h3>Canaries</h3>" in page


def test_canary_exposure_rises_with_training(data, trained, untrained, tmp_path):
    hot = report(trained, data, tmp_path)["canaries"]
    cold = report(untrained, data, tmp_path)["canaries"]
    top = 6 * math.log2(10)
    seen16 = next(c for c in hot["canaries"] if c["repeats"] == 16)
    assert not seen16["exact"] and seen16["candidates"] == 513 and seen16["exposure"] > 15
    assert max(c["exposure"] for c in cold["canaries"]) < 5
    assert all(0 <= c["exposure"] <= top == c["max_exposure"] for c in hot["canaries"] + cold["canaries"])
    assert set(hot["mean_exposure_by_repeats"]) == {"1", "16"}


def test_exact_exposure_is_the_rank_among_all_candidates(trained):
    plan = {"template": "my secret number is {secret}", "alphabet": "0123456789", "length": 2}
    secret = "42"
    got = memorisation.exposure(trained, plan, secret, n_candidates=100, generator=torch.Generator(), batch_size=16)
    tok, model = trained.tokenizer, trained.model

    def bits(text: str) -> float:  # -log2 p(text | EOS), token by token
        ids = [tok.eos_id, *tok.encode(text)]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0], -1)
        return -sum(logp[i, t].item() for i, t in enumerate(ids[1:])) / math.log(2)

    others = [bits(plan["template"].format(secret=a + b)) for a, b in itertools.product("0123456789", repeat=2)
              if a + b != secret]
    x = bits(plan["template"].format(secret=secret))
    rank = 1 + sum(o < x for o in others)
    assert got["exact"] and got["candidates"] == 100 and got["rank"] == rank
    assert got["exposure"] == pytest.approx(math.log2(100) - math.log2(rank), abs=1e-12)
    assert got["log_perplexity_bits"] == pytest.approx(x, abs=1e-4)


def test_the_section_says_when_it_does_not_apply(data, trained, tmp_path):
    torch.manual_seed(0)
    enc = Encoder(config_from_preset("encoder-tiny", vocab_size=50))
    out = report(LLM(enc, enc.cfg, None), data, tmp_path)
    assert out == {"applies": False, "reason": "extraction and membership inference need a decoder that continues "
                                               "text, not a model of the encoder family"}
    assert report(trained, None, tmp_path)["reason"].startswith("no prepared data directory")
    short = tmp_path / "short"
    prepare([str(write_docs(tmp_path / "docs", n=4, words=5))], str(short), tokenizer="char", val_fraction=0.5,
            progress=False)
    assert report(trained, short, tmp_path)["reason"] == f"no 32-token window fits inside one document of the train split of {short}"
    assert "does not apply" in memorisation.html(out)
    with pytest.raises(LMForgeError, match=re.escape("prefix_tokens + suffix_tokens = 128 exceeds the model's context (96)")):
        report(trained, data, tmp_path, prefix_tokens=64, suffix_tokens=64)


def test_benchmark_quick_reports_every_figure(tmp_path, capsys, one_thread):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("memorisation_bench", Path(__file__).parents[1] / "benchmarks/memorisation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["quick"], res["steps"], res["demo"], res["canary_repeats"]) == (True, 40, None, [1, 4, 16])
    fit = res["overfit"]
    assert set(fit["auc_by_attack"]) == {"loss", "zlib"} and 0 <= fit["membership_auc"] <= 1
    assert 0 <= fit["extraction_rate_heldout"] <= fit["token_match_heldout"] <= 1
    assert set(fit["canary_exposure_by_repeats"]) == {"1", "4", "16"}
    assert (tmp_path / "overfit" / "checkpoints").is_dir()
