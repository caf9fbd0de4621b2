"""MLM pretraining for encoders: masking statistics, golden loss, exact resume, WordPiece data."""

import json
import math
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError
from lmforge.models.encoder import Encoder, config_from_preset
from lmforge.data.masking import IGNORE, Masker, mask_generator
from lmforge.train.mlm import MLMObjective
from lmforge.tokenizer import WORDPIECE_SPECIALS, Tokenizer
from reference_libs import reference_lib

WORDS = ("the cat dog sat on a mat and ran to house with big small red blue green quickly slowly happy sad "
         "movie film great bad good unbelievably wonderful").split()


def corpus(n_docs=120, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(n_docs)]


def test_masking_statistics_and_specials_never_masked():
    V, special = 1000, [0, 1, 2, 3, 4]
    masker = Masker(V, mask_id=4, special_ids=special, mask_prob=0.15)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, V, (64, 512), generator=g)
    x[:, 0], x[:, 100] = 2, 3  # [CLS] and a [SEP] in every row
    inp, labels = masker(x, mask_generator(1, 7, 0))
    chosen = labels != IGNORE
    assert not chosen[:, 0].any() and not chosen[:, 100].any()
    assert torch.equal(labels[chosen], x[chosen])  # labels are the original tokens
    assert torch.equal(inp[~chosen], x[~chosen])  # unselected tokens are untouched
    eligible = x.numel() - 2 * 64
    assert abs(chosen.sum().item() / eligible - 0.15) < 0.005
    n = chosen.sum().item()
    to_mask = (inp[chosen] == 4).sum().item() / n
    same = (inp[chosen] == x[chosen]).sum().item() / n
    rand = 1 - to_mask - same
    assert abs(to_mask - 0.8) < 0.015 and abs(same - 0.1) < 0.012 and abs(rand - 0.1) < 0.012
    assert not torch.isin(inp[chosen & (inp != 4) & (inp != x)], torch.tensor(special)).any()  # random != special
    # seeded: the same (seed, step, index) masks the same; another step masks differently
    again = masker(x, mask_generator(1, 7, 0))
    assert torch.equal(again[0], inp) and torch.equal(again[1], labels)
    assert not torch.equal(masker(x, mask_generator(1, 8, 0))[1], labels)


def test_whole_word_masking_selects_every_piece_of_a_word():
    V = 50
    start = torch.ones(V, dtype=torch.bool)
    start[30:] = False  # ids >= 30 are '##' continuation pieces
    masker = Masker(V, mask_id=4, special_ids=[0, 1, 2, 3, 4], mask_prob=0.3, word_start=start)
    g = torch.Generator().manual_seed(3)
    x = torch.where(torch.rand(32, 200, generator=g) < 0.5, torch.randint(5, 30, (32, 200), generator=g),
                    torch.randint(30, 50, (32, 200), generator=g))
    x[:, 0] = 2
    _, labels = masker(x, mask_generator(0, 0, 0))
    chosen = labels != IGNORE
    for b in range(32):
        word_chosen = None
        for t in range(1, 200):
            if bool(start[x[b, t]]):
                word_chosen = bool(chosen[b, t])
            elif word_chosen is not None:
                assert bool(chosen[b, t]) == word_chosen  # a continuation follows its word
    frac = chosen.float().sum() / (x.numel() - 32)
    assert 0.25 < frac < 0.35


def test_validation_batches_are_windows_with_cls_masked_with_the_eval_seed():
    from lmforge.data.masking import EVAL_MASK_SEED, masked_eval_batches, with_cls
    from lmforge.data.windows import EvalWindows

    tokens = np.arange(600) % 90 + 5  # no special ids (0..4)
    windows = EvalWindows(tokens, 15, 2, 3)
    masker = Masker(97, 4, [0, 1, 2, 3, 4], 0.3)
    batches = masked_eval_batches(windows, masker, cls_id=2)
    assert len(batches) == 3
    for i, batch in enumerate(batches):
        x = windows.batch(i)[0]
        assert batch["input_ids"].shape == batch["labels"].shape == (2, 16)
        assert (batch["input_ids"][:, 0] == 2).all() and (batch["labels"][:, 0] == IGNORE).all()  # [CLS], never masked
        expected = masker(with_cls(x, 2), mask_generator(EVAL_MASK_SEED, 0, i))
        assert torch.equal(batch["input_ids"], expected[0]) and torch.equal(batch["labels"], expected[1])
        chosen = batch["labels"][:, 1:] != IGNORE
        assert torch.equal(batch["labels"][:, 1:][chosen], x[chosen])
        assert torch.equal(batch["input_ids"][:, 1:][~chosen], x[~chosen])
    no_cls = masked_eval_batches(windows, masker, cls_id=None)
    assert no_cls[0]["input_ids"].shape == (2, 15)
    assert torch.equal(no_cls[0]["labels"], masker(windows.batch(0)[0], mask_generator(EVAL_MASK_SEED, 0, 0))[1])


def test_golden_loss_only_masked_positions_through_the_head():
    torch.manual_seed(0)
    model = Encoder(config_from_preset("encoder-tiny", vocab_size=97)).eval()
    x = torch.randint(5, 97, (4, 32))
    inp, labels = Masker(97, 4, [0, 1, 2, 3, 4], 0.3)(x, mask_generator(0, 0, 0))
    loss, stats = MLMObjective(most_frequent=7)(model, {"input_ids": inp, "labels": labels})
    full = F.cross_entropy(model(inp).flatten(0, 1), labels.flatten(), ignore_index=IGNORE)  # all positions, then ignore
    torch.testing.assert_close(loss, full, atol=1e-5, rtol=0)
    assert abs(loss.item() - math.log(97)) < 0.3  # a fresh model is near uniform
    assert stats["baseline_acc"].item() == pytest.approx((labels[labels != IGNORE] == 7).float().mean().item())


def test_wordpiece_tokenizer_specials_and_pairs(tmp_path):
    tok = Tokenizer.train_wordpiece(corpus(), vocab_size=120)
    assert [tok.hf.token_to_id(t) for t in WORDPIECE_SPECIALS] == [0, 1, 2, 3, 4]
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4)
    b = tok.batch(["the cat sat", "a dog"], pairs=["on the mat", None])
    ids, types = b["input_ids"][0].tolist(), b["token_type_ids"][0].tolist()
    a_ids, p_ids = tok.encode("the cat sat"), tok.encode("on the mat")
    assert ids == [2, *a_ids, 3, *p_ids, 3]
    assert types == [0] * (len(a_ids) + 2) + [1] * (len(p_ids) + 1)
    assert b["attention_mask"][1].sum() == len(tok.encode("a dog")) + 2 and b["input_ids"][1, -1] == 0
    # truncation keeps the specials and is counted
    cut = tok.batch(["the cat " * 50, "a dog"], max_length=16)
    assert cut["input_ids"].shape[1] == 16 and cut["input_ids"][0, -1] == 3 and cut["truncated"] == 1
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json", encoder=True)
    assert again.batch(["the cat sat"], ["on the mat"])["input_ids"][0].tolist() == ids


def test_hf_bert_and_roberta_tokenizers_load_as_they_are(tmp_path):
    tf = reference_lib("transformers")
    tok = Tokenizer.train_wordpiece(corpus(), vocab_size=120)
    tok.save(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok.tokenizer_config(64)))
    ref = tf.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    mine = Tokenizer.load(tmp_path / "tokenizer.json", encoder=True)
    texts, pairs = ["the cat sat on a mat", "happy movie"], ["a great film", "sad dog"]
    r = ref(texts, pairs, padding=True, return_token_type_ids=True, return_tensors="pt")
    m = mine.batch(texts, pairs)
    assert torch.equal(r["input_ids"], m["input_ids"]) and torch.equal(r["token_type_ids"], m["token_type_ids"])
    # a RoBERTa-style byte-level BPE tokenizer.json with <s> a </s></s> b </s>
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, processors, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    hf.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    (tmp_path / "rob").mkdir()
    hf.save(str(tmp_path / "rob" / "tokenizer.json"))
    rob = Tokenizer.load(tmp_path / "rob" / "tokenizer.json", encoder=True)
    assert (rob.cls_id, rob.sep_id, rob.pad_id, rob.mask_id) == (0, 2, 1, 4)
    row = rob.batch(["the cat"], ["a dog"])["input_ids"][0].tolist()
    assert row[0] == 0 and row.count(2) == 3 and row[-1] == 2


def test_mlm_pretraining_runs_and_resumes_bit_exactly(tmp_path, capsys):
    from lmforge.data.prepare import prepare
    from lmforge.train.pretrain import run_training

    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in corpus(200)))
    meta = prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "data"), tokenizer="wordpiece", vocab_size=100,
                   progress=False)
    assert meta["tokenizer"]["kind"] == "wordpiece" and meta["eos_id"] == 3 and meta["pad_id"] == 0
    over = ["--train.objective", "mlm", "--model.preset", "encoder-tiny", "--train.max_steps", "8",
            "--train.micro_batch_size", "4", "--train.seq_len", "32", "--train.eval_every", "4", "--train.eval_iters", "2",
            "--train.ckpt_every", "4", "--train.progress", "false", "--train.lr", "3e-3", "--train.warmup_steps", "2", "--train.log_every", "1",
            "--objective.mask_prob", "0.3", "--objective.whole_word_mask", "true"]
    full = run_training(str(tmp_path / "data"), str(tmp_path / "full"), overrides=over)
    assert full["steps"] == 8 and full["val_ppl"] is None
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert {"val_acc", "val_baseline_acc"} <= set(evals[-1])
    assert 0 <= evals[-1]["val_baseline_acc"] < 0.5
    # SIGKILL after step 4 (its checkpoint written), resume: same losses and weights as the run without a stop
    import subprocess

    from train_fixtures import killed_cli

    # on this process's CPU threads, as the runs here: float sums depend on the thread count
    proc = subprocess.run(killed_cli(4, ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "part"),
                                         "--threads", str(torch.get_num_threads()), *over]), capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_training(str(tmp_path / "data"), str(tmp_path / "part"), overrides=over, resume="auto")

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert losses("full") == losses("part") and len(losses("full")) == 8
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "full/checkpoints/step_00000008/model.safetensors")
    wb = load_file(tmp_path / "part/checkpoints/step_00000008/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # lmforge eval on the MLM encoder: masked loss / accuracy with a fixed mask, the same every time
    from lmforge.eval.mlm import evaluate_mlm

    ev = evaluate_mlm(str(tmp_path / "full"), str(tmp_path / "data"), seq_len=32)
    again = evaluate_mlm(str(tmp_path / "part"), str(tmp_path / "data"), seq_len=32, progress=True)
    batches = ev["windows"] // 8  # batch_size 8
    assert re.search(rf"\reval: 100%\|[^|]*\| {batches}/{batches} \[", capsys.readouterr().err)
    assert {k: v for k, v in ev.items() if k != "checkpoint"} == {k: v for k, v in again.items() if k != "checkpoint"}
    assert ev["masked_tokens"] > 0 and 0 <= ev["mlm_acc"] <= 1 and ev["mlm_loss"] < math.log(100) + 1


def test_mlm_needs_an_mlm_head(tmp_path):
    from lmforge.data.prepare import prepare
    from lmforge.train.pretrain import run_training

    (tmp_path / "c.txt").write_text("\n\n".join(corpus(60)))
    prepare([str(tmp_path / "c.txt")], str(tmp_path / "data"), tokenizer="wordpiece", vocab_size=100, progress=False)
    with pytest.raises(LMForgeError, match="needs an encoder with an MLM head; set --model.head mlm"):
        run_training(str(tmp_path / "data"), str(tmp_path / "r"),
                     overrides=["--train.objective", "mlm", "--model.preset", "bert-tiny", "--train.max_steps", "1"])
