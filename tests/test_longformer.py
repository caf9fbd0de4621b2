"""Longformer attention (nn/longformer.py, attention="longformer" encoders): the attention against a dense
masked reference, parity with transformers' Longformer (every head, lengths off the window multiple,
padded batches) both ways, that global tokens matter and windows are local, linear memory, and
`lmforge finetune classify` / LLM.classify with global tokens."""

import dataclasses
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from reference_libs import reference_lib
tf = reference_lib("transformers")

from lmforge.checkpoint import write_model_dir
from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.infer.llm import LLM
from lmforge.interop.hf import convert_from_hf, convert_to_hf, load_hf_dir
from lmforge.models.encoder import Encoder, EncoderConfig, config_from_preset, global_attention_mask
from lmforge.nn.longformer import GlobalTokens, global_rows, window_attention
from lmforge.tokenizer import Tokenizer

SUFFIX_HEAD = {"Model": "none", "ForMaskedLM": "mlm", "ForSequenceClassification": "sequence",
               "ForTokenClassification": "token"}


def hf_config(**extra):
    # windows 4 and 6 (2 and 3 keys a side); 21 tokens is a multiple of neither, so transformers pads
    return tf.LongformerConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=48, max_position_embeddings=80, attention_window=[4, 6],
                               type_vocab_size=1, pad_token_id=1, **extra)


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 99, (3, 21), generator=g)
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[1, 14:] = 0
    mask[2, 7:] = 0
    glob = torch.zeros(3, 21, dtype=torch.long)
    glob[0, [0, 5, 17]] = 1  # rows hold different numbers of global tokens
    glob[1, 0] = 1
    glob[2, [2, 3]] = 1
    return ids.masked_fill(mask == 0, 1), mask, glob


def dense_reference(q, k, v, qg, kg, vg, valid, glob, w):
    """Longformer attention written out with the full T x T matrix (float64)."""
    B, H, T, D = q.shape
    i = torch.arange(T)
    band = (i[:, None] - i[None, :]).abs() <= w
    allowed = (band[None] | glob[:, None, :]) & valid[:, None, :] | ~valid[:, :, None]  # padding rows: zeroed below
    s = (q @ k.transpose(-1, -2)) / D ** 0.5
    y = s.masked_fill(~allowed[:, None], float("-inf")).softmax(-1) @ v
    sg = (qg @ kg.transpose(-1, -2)) / D ** 0.5
    yg = sg.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1) @ vg
    y = torch.where(glob[:, None, :, None], yg, y)
    return y.masked_fill(~valid[:, None, :, None], 0.0)


@pytest.mark.parametrize("w,chunk", [(3, 2), (3, 3), (4, 7), (8, 64)])
def test_window_attention_equals_the_dense_masked_reference(w, chunk):
    torch.manual_seed(0)
    B, H, T, D = 3, 2, 23, 8
    q, k, v, qg, kg, vg = (torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(6))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 15:] = False
    valid[2, 4:] = False
    glob = torch.zeros(B, T, dtype=torch.bool)
    glob[0, [0, 11, 22]] = True
    glob[1, 3] = True
    tokens = GlobalTokens.build(valid, glob)
    y = window_attention(q, k, v, w, tokens, chunk=chunk).transpose(1, 2)
    pos, real = tokens.pos_BG, tokens.real_BG
    yg = global_rows(qg.gather(2, pos[:, None, :, None].expand(B, H, pos.shape[1], D)), kg, vg, tokens)
    for b, g in zip(*real.nonzero(as_tuple=True)):
        y[b, :, pos[b, g]] = yg[b, :, g]
    want = dense_reference(q, k, v, qg, kg, vg, valid, glob, w)
    torch.testing.assert_close(y, want, atol=1e-12, rtol=0)
    r = torch.randn_like(want)  # and the gradients (training runs through the same code)
    got_grads = torch.autograd.grad((y * r).sum(), (q, k, v, qg, kg, vg))
    want_grads = torch.autograd.grad((want * r).sum(), (q, k, v, qg, kg, vg))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("suffix", list(SUFFIX_HEAD))
def test_import_parity_every_head_padded_and_off_the_window_multiple(suffix, tmp_path):
    torch.manual_seed(0)
    ref = getattr(tf, "Longformer" + suffix)(hf_config(num_labels=3)).eval()
    ref.save_pretrained(tmp_path)
    model, cfg, _ = load_hf_dir(tmp_path)
    assert (cfg.attention, cfg.attention_window, cfg.head) == ("longformer", [4, 6], SUFFIX_HEAD[suffix])
    assert model.num_params() == sum(p.numel() for p in ref.parameters()) == cfg.num_params()
    ids, mask, glob = batch()
    for g in (glob, None):  # None: the head's default ([CLS] for a sequence classifier, else none)
        with torch.no_grad():
            out = ref(input_ids=ids, attention_mask=mask, global_attention_mask=g, output_hidden_states=True)
            gm = None if g is None else g.bool()
            h = model.encode(ids, mask.bool(), global_mask_BT=gm)
            y = model(ids, mask.bool(), global_mask_BT=gm)
        torch.testing.assert_close(h, out.last_hidden_state if suffix == "Model" else out.hidden_states[-1],
                                   atol=1e-4, rtol=0)
        if suffix != "Model":
            torch.testing.assert_close(y, out.logits, atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(model.pooled(h), out.pooler_output, atol=1e-4, rtol=0)


@pytest.mark.parametrize("suffix", ["ForMaskedLM", "ForSequenceClassification"])
def test_export_loads_in_transformers_with_equal_logits(suffix, tmp_path):
    torch.manual_seed(1)
    ref = getattr(tf, "Longformer" + suffix)(hf_config(num_labels=2, id2label={0: "neg", 1: "pos"},
                                                       label2id={"neg": 0, "pos": 1})).eval()
    ref.save_pretrained(tmp_path / "src")
    convert_from_hf(str(tmp_path / "src"), str(tmp_path / "lm"))
    meta = json.loads((tmp_path / "lm" / "model_config.json").read_text())
    assert meta["config"]["attention"] == "longformer" and meta["config"]["attention_window"] == [4, 6]
    convert_to_hf(str(tmp_path / "lm"), str(tmp_path / "out"))
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["architectures"] == ["Longformer" + suffix] and hf["attention_window"] == [4, 6]
    back, info = getattr(tf, "Longformer" + suffix).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask, glob = batch()
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, global_attention_mask=glob).logits
        b = back.eval()(input_ids=ids, attention_mask=mask, global_attention_mask=glob).logits
        c = LLM.load(tmp_path / "lm").model(ids, mask.bool(), global_mask_BT=glob.bool())
        d = LLM.load(tmp_path / "src").model(ids, mask.bool(), global_mask_BT=glob.bool())  # the HF folder itself
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, a, atol=1e-4, rtol=0)
    torch.testing.assert_close(d, a, atol=1e-4, rtol=0)


def test_native_longformer_exports_and_rope_shape_refuses(tmp_path):
    torch.manual_seed(2)
    shape = dict(config_from_preset("roberta-base").__dict__, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64,
                 vocab_size=99, block_size=66, head="sequence", labels=["a", "b"], attention="longformer",
                 attention_window=[8], preset=None, pooler=False)
    model = Encoder(EncoderConfig(**shape)).eval()
    write_model_dir(tmp_path / "m", model)
    convert_to_hf(str(tmp_path / "m"), str(tmp_path / "hf"))
    ref = tf.LongformerForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask.bool()), ref(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-4, rtol=0)
    native = Encoder(config_from_preset("encoder-tiny", attention="longformer", attention_window=[8], local_window=None))
    write_model_dir(tmp_path / "n", native)
    with pytest.raises(LMForgeError, match="this longformer encoder has no Hugging Face equivalent"):
        convert_to_hf(str(tmp_path / "n"), str(tmp_path / "hf2"))


def test_with_a_window_past_the_sequence_it_is_full_attention_rope_included():
    """Window >= 2T and global projections equal to the local ones: the longformer computes exactly
    what the standard encoder computes (rope on global queries and keys included), padding too."""
    torch.manual_seed(3)
    cfg = config_from_preset("encoder-tiny", local_window=None, head="none")
    dense = Encoder(cfg).eval()
    lf = Encoder(dataclasses.replace(cfg, attention="longformer", attention_window=[64])).eval()
    state = dense.state_dict()
    for i in range(cfg.n_layer):
        qkv = state[f"blocks.{i}.attn.qkv.weight"]
        state[f"blocks.{i}.attn.q_global.weight"] = qkv[:cfg.n_embd]
        state[f"blocks.{i}.attn.kv_global.weight"] = qkv[cfg.n_embd:]
    lf.load_state_dict(state)
    ids = torch.randint(5, 500, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 19:] = False
    glob = torch.zeros(2, 30, dtype=torch.bool)
    glob[0, [0, 7]] = True
    glob[1, 12] = True
    with torch.no_grad():
        want = dense.encode(ids, mask)
        got = lf.encode(ids, mask, global_mask_BT=glob)
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)


def test_global_tokens_matter_and_windows_are_local():
    torch.manual_seed(4)
    cfg = config_from_preset("encoder-tiny", local_window=None, head="none", attention="longformer",
                             attention_window=[4], init_std=0.2)
    model = Encoder(cfg).eval()
    ids = torch.randint(5, 500, (1, 40))
    far = ids.clone()
    far[0, 0] = (far[0, 0] + 1) % 500  # a different first token
    none = torch.zeros(1, 40, dtype=torch.bool)
    cls = none.clone()
    cls[0, 0] = True
    with torch.no_grad():
        h_none, h_far_none = model.encode(ids, global_mask_BT=none), model.encode(far, global_mask_BT=none)
        h_cls, h_far_cls = model.encode(ids, global_mask_BT=cls), model.encode(far, global_mask_BT=cls)
    # two layers of 2 keys a side: token 30 cannot see token 0 without global attention ...
    assert torch.equal(h_none[0, 30], h_far_none[0, 30])
    # ... and sees it (and every token sees the global one) when token 0 is global
    assert (h_cls[0, 30] - h_far_cls[0, 30]).abs().max() > 1e-3
    assert (h_cls - h_none).abs().amax(-1).min() > 1e-4  # every token attends to the global one
    # the global token reads the whole sequence: a change at the end reaches it
    last = ids.clone()
    last[0, 39] = (last[0, 39] + 1) % 500
    with torch.no_grad():
        assert (model.encode(last, global_mask_BT=cls)[0, 0] - h_cls[0, 0]).abs().max() > 1e-3
        assert torch.equal(model.encode(last, global_mask_BT=none)[0, 0], h_none[0, 0])


def _largest_allocation(T: int) -> int:
    torch.manual_seed(0)
    cfg = config_from_preset("encoder-tiny", local_window=None, head="none", attention="longformer",
                             attention_window=[64], block_size=T, n_layer=1)
    model = Encoder(cfg).eval()
    ids = torch.randint(5, 500, (1, T))
    with torch.no_grad(), torch.profiler.profile(profile_memory=True) as prof:
        model.encode(ids)
    return max(e.cpu_memory_usage for e in prof.events())


def test_memory_is_linear_in_length():
    """No op allocates anything near the n x n scores: the largest allocation of a forward pass grows
    as T (doubling T at most doubles it) and stays far below H x T x T floats."""
    small, large = _largest_allocation(2048), _largest_allocation(4096)
    assert large <= 2.1 * small
    assert large * 32 < 4 * 4096 * 4096 * 4  # H x T x T fp32 scores would be 268 MB; the MLP's 4 MB is the largest


def test_config_errors_are_one_line():
    with pytest.raises(LMForgeError, match="model.attention_window values must be positive and even, got 5"):
        config_from_preset("encoder-tiny", local_window=None, attention="longformer", attention_window=[5])
    with pytest.raises(LMForgeError, match=r"model.attention_window has 3 values; give one, or one per layer \(2\)"):
        config_from_preset("encoder-tiny", local_window=None, attention="longformer", attention_window=[4, 4, 4])
    with pytest.raises(LMForgeError, match="model.local_window and model.attention longformer exclude each other"):
        config_from_preset("encoder-small", attention="longformer")
    with pytest.raises(LMForgeError, match="model.attention_window is for model.attention longformer"):
        config_from_preset("encoder-tiny", attention_window=[4])
    assert config_from_preset("encoder-tiny", attention="longformer").attention_window == [512, 512]


def test_question_global_mask_is_everything_before_the_first_separator():
    ids = torch.tensor([[0, 7, 8, 2, 2, 9, 2, 1], [0, 7, 2, 2, 9, 9, 2, 1]])
    assert global_attention_mask(ids, "question", 2).int().tolist() == [[1, 1, 1, 0, 0, 0, 0, 0],
                                                                       [1, 1, 0, 0, 0, 0, 0, 0]]
    assert global_attention_mask(ids, "cls").int().tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]] * 2
    with pytest.raises(LMForgeError, match="a row has no separator token to end its question"):
        global_attention_mask(ids, "question", 3)


WORDS_POS, WORDS_NEG = "great wonderful happy good".split(), "bad awful sad terrible".split()
FILLER = "the movie film was a and it plot".split()


def _rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lab = rng.choice(["positive", "negative"])
        w = [rng.choice(FILLER) for _ in range(rng.randint(20, 40))] + [rng.choice(WORDS_POS if lab == "positive" else WORDS_NEG)]
        rng.shuffle(w)
        rows.append({"text": " ".join(w), "text_pair": "was it good", "label": lab})
    return rows


def test_finetune_classify_with_global_tokens_from_the_cli(tmp_path, capsys):
    tok = Tokenizer.train_wordpiece([r["text"] for r in _rows(100, 9)], vocab_size=64)
    tok.save(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    base = Encoder(config_from_preset("encoder-tiny", vocab_size=tok.vocab_size, local_window=None,
                                      attention="longformer", attention_window=[8]))
    write_model_dir(tmp_path / "base", base, tmp_path / "tokenizer.json")
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _rows(64, 1)))
    val.write_text("".join(json.dumps(r) + "\n" for r in _rows(16, 2)))
    out = tmp_path / "run"
    common = ["finetune", "classify", "--base", str(tmp_path / "base"), "--data", str(train), "--val-data", str(val),
              "--train.max_steps", "4", "--train.eval_every", "4", "--train.progress", "false",
              "--train.micro_batch_size", "8"]
    assert main(common + ["--out", str(out), "--model.global_attention", "question"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= summary["accuracy"] <= 1.0
    llm = LLM.load(out)
    assert llm.model.cfg.attention == "longformer" and llm.model.cfg.head == "sequence"
    texts = [r["text"] for r in _rows(3, 3)]
    cls = llm.classify(texts)  # [CLS] global by default
    ids = llm.tokenizer.batch(texts)["input_ids"]
    with torch.no_grad():
        want = llm.model(ids, ids != llm.tokenizer.pad_id, global_mask_BT=global_attention_mask(ids, "cls")).softmax(-1)
    assert [r["probs"]["positive"] for r in cls] == pytest.approx(want[:, 1].tolist(), abs=1e-6)
    question = llm.classify(texts, ["was it good"] * 3, global_attention="question")
    assert len(question) == 3 and {r["label"] for r in question} <= {"positive", "negative"}
    # a standard encoder has no global tokens to set: a one-line error, nothing written
    plain = Encoder(config_from_preset("encoder-tiny", vocab_size=tok.vocab_size))
    write_model_dir(tmp_path / "plain", plain, tmp_path / "tokenizer.json")
    rc = main(common[:3] + [str(tmp_path / "plain")] + common[4:] + ["--out", str(tmp_path / "bad"),
                                                                       "--model.global_attention", "cls"])
    assert rc == 2 and "--model.global_attention is for longformer encoders" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_benchmark_quick_reports_the_curve_and_agrees_with_transformers(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import longformer as bench

    assert bench.main(["--quick", "--threads", "1", "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert list(r["curve"]) == ["64", "128"] and r["shape"]["window"] == 16 and r["shape"]["global_tokens"] == 1
    for row in r["curve"].values():
        assert row["max_abs_diff"] < 1e-4  # lmforge's longformer and transformers' on the same weights
        for v in bench.VARIANTS:
            assert row[f"{v}_s"] > 0
        assert row["time_vs_dense"] == pytest.approx(row["longformer_s"] / row["dense_s"], abs=1e-3)
    last = r["curve"]["128"]
    assert last["longformer_working_bytes"] >= 0 and last["dense_working_bytes"] >= 0 and "memory_vs_dense" in last
    assert r["targets"] == []  # targets are judged at 4,096 tokens only


def test_long_document_task_quick_splits_whole_plays_and_trains_both_runs(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import longformer as bench

    rng = random.Random(0)
    plays = tmp_path / "plays"
    plays.mkdir()
    cue = {"comedy": "jest", "history": "crown", "tragedy": "death"}
    for genre, names in bench.GENRES.items():
        for name in names:
            lines = [" ".join(rng.choice(FILLER + [cue[genre]]) for _ in range(8)) + "\n" for _ in range(40)]
            (plays / f"{name}_gut.txt").write_text("".join(lines))
    work = tmp_path / "work"
    work.mkdir()
    r = bench.run_task(bench.QUICK_TASK, plays, work)
    test_rows = [json.loads(x) for x in (work / "test.jsonl").read_text().splitlines()]
    train_rows = [json.loads(x) for x in (work / "train.jsonl").read_text().splitlines()]
    assert {x["play"] for x in test_rows} == set(bench.TEST_PLAYS)  # whole plays held out
    assert not {x["play"] for x in train_rows} & set(bench.TEST_PLAYS)
    assert sum(r["passages"]["test"].values()) == len(test_rows) and r["passages"]["test"]["history"] > 0
    assert set(r["accuracy"]) == {"whole", "truncated"} and all(0 <= a <= 1 for a in r["accuracy"].values())
    meta = json.loads((work / "whole/checkpoints/step_00000002/model_config.json").read_text())
    assert meta["config"]["attention"] == "longformer" and meta["config"]["attention_window"] == [8]
