"""Reward model head, preference data, DPO and reward training through the one loop."""

from __future__ import annotations

import json
import math
import random
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_tensors, write_model_dir
from lmforge.models.registry import load_model_dir
from lmforge.data.alignment_data import ReadStats, encode_pairs, read_preferences, read_prompts
from lmforge.errors import LMForgeError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.heads import DecoderClassifier, DecoderWithValueHead
from lmforge.tokenizer import Tokenizer

ALPHA = "abcdefghijklmnopqrstuvwxyz0123456789 +-=?:"


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("align")
    tok = Tokenizer.train_char([ALPHA])
    tok.save(d / "tok.json")
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    write_model_dir(d / "base", m, d / "tok.json")
    rng = random.Random(0)
    with open(d / "pairs.jsonl", "w") as f:
        for _ in range(40):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}) + "\n")
    return d


def _classifier(vocab=40, **kw):
    torch.manual_seed(1)
    dec = Decoder(DecoderConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=16, **kw))
    return DecoderClassifier.from_decoder(dec).eval()


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_reward_head_reads_last_real_token_any_padding(pos):
    model = _classifier(pos_encoding=pos)
    seqs = [[5, 6, 7, 8, 9], [11, 12], [0, 13, 0]]  # 0 plays EOS = pad: an EOS inside the text is a real token
    alone = [model(torch.tensor([s]))[0, 0].item() for s in seqs]
    T = max(map(len, seqs))
    right = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    rmask = torch.tensor([[True] * len(s) + [False] * (T - len(s)) for s in seqs])
    left = torch.tensor([[0] * (T - len(s)) + s for s in seqs])
    lmask = torch.tensor([[False] * (T - len(s)) + [True] * len(s) for s in seqs])
    with torch.no_grad():
        r = model(right, pad_mask_BT=rmask)[:, 0].tolist()
        l_ = model(left, pad_mask_BT=lmask)[:, 0].tolist()
        # batch composition changes nothing: the short row with different company
        other = model(torch.tensor([[11, 12, 0, 0, 0], [1, 2, 3, 4, 5]]),
                      pad_mask_BT=torch.tensor([[1, 1, 0, 0, 0], [1] * 5]).bool())[0, 0].item()
    assert r == pytest.approx(alone, abs=1e-5)
    assert l_ == pytest.approx(alone, abs=1e-5)
    assert other == pytest.approx(alone[1], abs=1e-5)
    # a different last token gives a different score (it is really the last token that is read)
    assert model(torch.tensor([[11, 13]]))[0, 0].item() != pytest.approx(alone[1], abs=1e-6)


def test_classifier_and_value_model_save_and_load(tmp_path):
    model = _classifier()
    write_model_dir(tmp_path / "rm", model)
    loaded, cfg, _ = load_model_dir(tmp_path / "rm")
    assert type(loaded).__name__ == "DecoderClassifier" and cfg.num_labels == 1
    assert "lm_head.weight" not in load_tensors(tmp_path / "rm" / "model.safetensors")
    x = torch.tensor([[3, 4, 5]])
    assert torch.equal(loaded(x), model(x))
    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=16))
    pv = DecoderWithValueHead.from_decoder(dec)
    logits, values = pv(x, values=True)
    assert torch.equal(logits, dec(x)) and values.shape == (1, 3)
    assert torch.equal(pv.to_decoder()(x), dec(x))


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_preference_formats_and_errors(tmp_path):
    u = {"role": "user", "content": "hi"}
    a1, a2 = {"role": "assistant", "content": "yes"}, {"role": "assistant", "content": "no"}
    f = _write(tmp_path / "p.jsonl", [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"chosen": [u, a1], "rejected": [u, a2]},            # implicit prompt: the shared leading turn
        {"prompt": "x", "chosen": "same", "rejected": "same"},  # identical: skipped and counted
    ])
    stats = ReadStats()
    pairs = read_preferences(f, stats)
    assert len(pairs) == 2 and stats.identical_skipped == 1
    assert pairs[1].prompt == [u] and pairs[1].chosen == [a1] and pairs[1].rejected == [a2]
    bad = [
        ("not json", "p.jsonl:1: not valid JSON"),
        ({"prompt": "a", "chosen": "b"}, "p.jsonl:1: a preference pair needs 'chosen' and 'rejected'"),
        ({"prompt": "a", "chosen": "", "rejected": "c"}, "p.jsonl:1: 'chosen' completion is empty"),
        ({"chosen": [a1], "rejected": [a2]}, "p.jsonl:1: 'chosen' and 'rejected' share no leading turn"),
        ({"prompt": "a", "chosen": [{"role": "bot", "content": "x"}], "rejected": "c"},
         "p.jsonl:1: chosen\\[0\\] has unknown role 'bot'"),
        ({"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}, "p.jsonl:1: 'margin' must be a number"),
    ]
    for row, msg in bad:
        _write(f, [row])
        with pytest.raises(LMForgeError, match=msg):
            read_preferences(f)
    _write(f, [{"prompt": "a", "answer": 3}, {"question": "b"}])
    with pytest.raises(LMForgeError, match="p.jsonl:2: an RL example needs a 'prompt' field"):
        read_prompts(f)


def test_encoded_pairs_end_with_eos_and_drop_long(base):
    tok = Tokenizer.from_file(base / "tok.json")
    pairs = read_preferences(base / "pairs.jsonl")
    stats = ReadStats()
    enc = encode_pairs(tok, pairs, 64, stats)
    assert all(e.chosen[-1] == tok.eos_id and e.rejected[-1] == tok.eos_id for e in enc)
    assert tok.decode(enc[0].prompt) + tok.decode(enc[0].chosen[:-1]) == pairs[0].prompt + pairs[0].chosen
    enc = encode_pairs(tok, pairs, 6, stats)  # "a+b=" (4) + 2..3 completion tokens: the longer ones drop
    assert 0 < stats.too_long_skipped < 40 and len(enc) == 40 - stats.too_long_skipped


def _args(fixture, out, **kw):
    base = fixture
    a = dict(base=str(base / "base"), data=str(base / "pairs.jsonl"), out=str(out), val_data=None, val_fraction=0.2,
             config=None, recipe=None, resume=None, overwrite=False)
    return types.SimpleNamespace(**{**a, **kw})


OV = ["--train.max_steps", "4", "--train.lr", "1e-3", "--train.micro_batch_size", "4", "--train.log_every", "1",
      "--train.progress", "false", "--train.ckpt_every", "2", "--train.keep_checkpoints", "0", "--train.warmup_steps", "1"]


def _rows(run):
    return [json.loads(line) for line in open(Path(run) / "metrics.jsonl")]


def _train(method, args, ov):
    from lmforge.finetune.scaffold import prepare
    from lmforge.train.loop import train_job

    job, cfg = prepare(method, args, ov)
    return train_job(job, cfg.train, args.out, resume=args.resume)


# ---- reference computations: the runs below, redone in plain PyTorch ---------------------------

SEED = 1337  # train.seed's default


def _reference_sampling(n_pairs: int, legacy: bool = False) -> tuple[set[int], list[int]]:
    """(held-out pair indices of --val-fraction 0.2, the order of epoch 0 over the training pairs).
    The scaffold's: torch.randperm seeded by train.seed, then by seed * 1_000_003 + epoch. legacy:
    numpy's generators, as the alignment methods sampled before the scaffold was shared; the golden
    numbers measured then anchor the reference computation itself."""
    n_val = round(0.2 * n_pairs)
    if legacy:
        held = np.random.default_rng(SEED).permutation(n_pairs)[:n_val].tolist()
        return set(held), np.random.default_rng([SEED, 0]).permutation(n_pairs - n_val).tolist()
    held = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(SEED))[:n_val].tolist()
    order = torch.randperm(n_pairs - n_val, generator=torch.Generator().manual_seed(SEED * 1_000_003)).tolist()
    return set(held), order


def _reference_training_pairs(fixture, legacy=False):
    tok = Tokenizer.from_file(fixture / "tok.json")
    pairs = read_preferences(fixture / "pairs.jsonl")
    held, order = _reference_sampling(len(pairs), legacy)
    train = encode_pairs(tok, [p for i, p in enumerate(pairs) if i not in held], 64)
    return train, order


def _completion_logp(model, prompt, completion):
    """log p(completion | prompt), one sequence alone (no batch, no padding)."""
    import torch.nn.functional as F

    logp = F.log_softmax(model(torch.tensor([prompt + completion]))[0, :-1].float(), -1)
    return sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(completion))


def _reference_dpo_losses(fixture, legacy=False) -> list[float]:
    """The first 4 losses of OV's DPO run: beta 0.1, sigmoid loss, 4 pairs per step in epoch order,
    AdamW (0.9, 0.95, eps 1e-8, no decay), gradients clipped to norm 1, lr 1e-3 warmed up over 1 step
    and then cosine towards 1e-4 over 4 steps."""
    import torch.nn.functional as F

    train, order = _reference_training_pairs(fixture, legacy)
    policy = load_model_dir(fixture / "base")[0].train()
    with torch.no_grad():
        ref = [(_completion_logp(policy, p.prompt, p.chosen), _completion_logp(policy, p.prompt, p.rejected))
               for p in train]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    losses = []
    for step in range(4):
        batch = order[4 * step:4 * step + 4]
        margins = torch.stack([(_completion_logp(policy, train[i].prompt, train[i].chosen) - ref[i][0])
                               - (_completion_logp(policy, train[i].prompt, train[i].rejected) - ref[i][1])
                               for i in batch])
        loss = -F.logsigmoid(0.1 * margins).mean()
        losses.append(loss.item())
        for group in opt.param_groups:
            group["lr"] = 1e-4 + 0.5 * (1 + math.cos(math.pi * max(step - 1, 0) / 3)) * 9e-4
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
    return losses


def _reference_reward_first_loss(fixture, legacy=False) -> float:
    """The first loss of OV's reward run: a score head drawn after seeding with train.seed (as the
    loop does), Bradley-Terry on the first 4 pairs of epoch 0."""
    import torch.nn.functional as F

    train, order = _reference_training_pairs(fixture, legacy)
    torch.manual_seed(SEED)
    rm = DecoderClassifier.from_decoder(load_model_dir(fixture / "base")[0], num_labels=1).train()
    with torch.no_grad():
        first = [train[i] for i in order[:4]]
        r_chosen = torch.stack([rm(torch.tensor([p.prompt + p.chosen]))[0, 0] for p in first])
        r_rejected = torch.stack([rm(torch.tensor([p.prompt + p.rejected]))[0, 0] for p in first])
    return float(-F.logsigmoid(r_chosen - r_rejected).mean())


def test_reference_computations_reproduce_the_golden_numbers(base):
    """Under the sampling of the time they were measured, the reference computations give the golden
    numbers: the math of DPO and of the reward loss has not changed."""
    assert _reference_dpo_losses(base, legacy=True)[3] == pytest.approx(GOLDEN_DPO_STEP4, abs=1e-4)
    assert _reference_reward_first_loss(base, legacy=True) == pytest.approx(GOLDEN_RM_STEP1, abs=1e-4)


def test_dpo_first_step_is_ln2_golden_and_resume_exact(base, tmp_path):
    run = tmp_path / "dpo"
    _train("dpo", _args(base, run), OV)
    rows = [r for r in _rows(run) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/margins"] == 0.0 and rows[0]["rewards/chosen"] == 0.0
    for r in rows:  # the logged statistics agree with one another
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
        assert r["rewards/accuracies"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # a fraction of the 4 pairs of a step
        assert r["logps/chosen"] < 0 and r["logps/rejected"] < 0
        # -log sigmoid is convex: the mean loss is at least the loss of the mean margin
        assert r["loss"] >= -torch.nn.functional.logsigmoid(torch.tensor(r["rewards/margins"])).item() - 1e-6
    val = [r for r in _rows(run) if "val_loss" in r]  # one evaluation, at the end, of the 8 held-out pairs
    assert [r["step"] for r in val] == [4] and val[0]["val_rewards/accuracies"] in {i / 8 for i in range(9)}
    assert val[0]["val_rewards/margins"] == pytest.approx(val[0]["val_rewards/chosen"] - val[0]["val_rewards/rejected"],
                                                          abs=1e-6)
    # the losses, the one after three updates included, are those of the same DPO in plain PyTorch
    reference = _reference_dpo_losses(base)
    assert [r["loss"] for r in rows] == pytest.approx(reference, abs=1e-4)
    # resume from the step-2 checkpoint reproduces step 4 bit for bit
    resumed = tmp_path / "dpo_resumed"
    _train("dpo", _args(base, resumed, resume=str(run / "checkpoints" / "step_00000002")), OV)
    a = load_tensors(run / "checkpoints" / "step_00000004" / "model.safetensors")
    b = load_tensors(resumed / "checkpoints" / "step_00000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


GOLDEN_DPO_STEP4 = 0.6665841  # measured once on this fixture (legacy sampling); a change means the math changed


def test_dpo_reference_pass_uses_the_training_precision(base, tmp_path):
    """Under bf16 autocast the reference log-probs come from a bf16 forward as well: step 1 is ln 2
    and its margins 0, not the bf16-vs-fp32 rounding difference."""
    run = tmp_path / "dpo"
    _train("dpo", _args(base, run), OV[:1] + ["1"] + OV[2:] + ["--train.dtype", "bfloat16"])
    first = [r for r in _rows(run) if "loss" in r][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0.0


def test_dpo_grad_accumulation_equals_full_batch(base):
    from lmforge.data.alignment_data import encode_pairs
    from lmforge.finetune.preference import DPOObjective, pair_batch, reference_logps

    tok = Tokenizer.from_file(base / "tok.json")
    enc = encode_pairs(tok, read_preferences(base / "pairs.jsonl"), 64)[:8]
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    ref = reference_logps(model, enc, tok.pad_id) - 0.3 * torch.arange(8.0)  # a reference that differs
    obj = DPOObjective(beta=0.5)
    full = pair_batch(enc, list(range(8)), tok.pad_id, ref)
    halves = [pair_batch(enc, list(range(i, i + 4)), tok.pad_id, ref) for i in (0, 4)]
    model.zero_grad()
    obj(model, full)[0].backward()
    g_full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for h in halves:
        (obj(model, h)[0] / 2).backward()
    for g, p in zip(g_full, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_rpo_alpha_adds_the_chosen_tokens_nll_to_dpo(base):
    """TRL's rpo_alpha: loss = DPO loss + alpha x cross-entropy of the chosen completions (mean per token)."""
    import torch.nn.functional as F

    from lmforge.finetune.preference import DPOObjective, pair_batch, reference_logps

    tok = Tokenizer.from_file(base / "tok.json")
    enc = encode_pairs(tok, read_preferences(base / "pairs.jsonl"), 64)[:6]
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    ref = reference_logps(model, enc, tok.pad_id) - 0.2
    batch = pair_batch(enc, list(range(6)), tok.pad_id, ref)
    plain, stats = DPOObjective(beta=0.1)(model, batch)
    rpo, _ = DPOObjective(beta=0.1, rpo_alpha=0.5)(model, batch)
    # the reference computation: token-level cross-entropy over the chosen rows (the first half);
    # labels[t] is the token that logits[t] predicts
    with torch.no_grad():
        logits = model(batch["ids"][:6])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:6].reshape(-1), ignore_index=-100)
    assert float(stats["nll_loss"]) == pytest.approx(float(ce), rel=1e-5)
    assert float((rpo - plain).detach()) == pytest.approx(0.5 * float(ce), rel=1e-5)


def test_reward_training_logs_and_scores(base, tmp_path):
    run = tmp_path / "rm"
    _train("reward", _args(base, run), OV)
    rows = _rows(run)
    for key in ("accuracy", "margin", "reward/chosen", "reward/rejected"):
        assert key in rows[0]
    assert rows[0]["loss"] == pytest.approx(_reference_reward_first_loss(base), abs=1e-4)
    model, cfg, _ = load_model_dir(run)
    assert type(model).__name__ == "DecoderClassifier"


GOLDEN_RM_STEP1 = 0.6933196  # measured once on this fixture (legacy sampling)


def test_chat_template_pairs_end_at_end_of_turn():
    from lmforge.data.alignment_data import encode_completion, encode_prompt, encode_scored
    from lmforge.tokenizer import CHATML_TEMPLATE

    tok = Tokenizer.train_char([ALPHA + "\n_<>|"])
    tok.chat_template = CHATML_TEMPLATE
    im_end = tok.token_to_id("<|im_end|>")
    msgs = [{"role": "user", "content": "1+1="}]
    p = encode_prompt(tok, msgs)
    assert p == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    c = encode_completion(tok, msgs, p, "2")
    # the reply, closed by its end-of-turn token; the template's trailing newline is not part of it
    assert tok.decode(c[:-1]) == "2" and c[-1] == im_end
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "2"}], tokenize=True)
    assert encode_scored(tok, "1+1=", "2") == full[:len(p) + len(c)]


def test_dpo_and_reward_on_an_imported_hugging_face_folder(base, tmp_path):
    """--base may be a Hugging Face folder (here: the tiny model exported by convert --to-hf)."""
    from lmforge.interop.hf import convert_to_hf

    hf = convert_to_hf(str(base / "base"), str(tmp_path / "hf"))
    assert (hf / "config.json").is_file()
    ov = ["--train.max_steps", "1", "--train.progress", "false", "--train.micro_batch_size", "4"]
    _train("dpo", _args(base, tmp_path / "dpo", base=str(hf)), ov)
    assert _rows(tmp_path / "dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    _train("reward", _args(base, tmp_path / "rm", base=str(hf)), ov)
    model, cfg, _ = load_model_dir(tmp_path / "rm")
    assert type(model).__name__ == "DecoderClassifier" and cfg.num_labels == 1


def test_align_demo_holds_out_whole_prompts():
    from lmforge.demo.align_demo import split_pairs_by_prompt

    pairs = [{"group": g, "chosen": f"c{g}{i}", "rejected": f"r{g}{i}"} for g in range(20) for i in range(g % 3 + 1)]
    train, held = split_pairs_by_prompt(pairs, 0.1)
    assert {p["group"] for p in held} == {0, 1}  # the first 10% of the prompts, with every pair they have
    assert len(held) == 3 and len(train) == len(pairs) - 3
    assert not {p["group"] for p in held} & {p["group"] for p in train}


def test_align_demo_prints_accuracy_by_task_per_stage():
    from lmforge.demo.align_demo import by_task_table

    lines = by_task_table({"sft": {"by_task": {"count": 0.269, "add": 1.0}},
                           "grpo": {"by_task": {"count": 0.383}}})
    assert lines == [f"{'accuracy by task':<18} {'add':>9} {'count':>9}",
                     f"{'sft':<18}    100.0%     26.9%",
                     f"{'grpo':<18} {'-':>9}     38.3%"]
