"""CLIP family: parity with transformers (CLIPModel / CLIPVisionModel / CLIPTextModel, both directions),
image preprocessing equal to CLIPImageProcessor, exact parameter counts, the InfoNCE loss by hand,
the `clip` training objective (runs, resumes bit-exactly), the LLM API (embed_image, embed, zero_shot)
and the CLI (embed --image, classify --image --labels)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from reference_libs import reference_lib
tf = reference_lib("transformers")

from lmforge.errors import LMForgeError
from lmforge.interop.hf import convert_from_hf, convert_to_hf, load_hf_dir
from lmforge.models.clip import CLIP, PRESETS, config_from_preset, contrastive_loss

TEXT = dict(vocab_size=99, bos_token_id=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=24, eos_token_id=98, pad_token_id=1)
VISION = dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=5, image_size=32,
              patch_size=8)


def hf_clip(**over):
    text, vision = dict(TEXT, **over.pop("text", {})), dict(VISION, **over.pop("vision", {}))
    return tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24, **over)


def text_batch(eos: int = 98):
    """Rows of different lengths, each ended by the EOS and right-padded with 1s (as a tokenizer batch)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (3, 12), generator=g)
    for row, n in enumerate((12, 7, 3)):
        ids[row, n - 1] = eos
        ids[row, n:] = 1
    return ids


def pixels(n: int = 3, side: int = 32):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(2))


def close(a, b, tol=1e-4):
    return torch.allclose(a.float(), b.float(), atol=tol, rtol=0), (a - b).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def seeded():
    torch.manual_seed(0)


# ---- parity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("eos", [98, 2])
def test_clip_model_import_parity(tmp_path, eos):
    """Image and text embeddings and both logits within 1e-4 of transformers (eos 2: HF's legacy argmax pooling)."""
    ref = tf.CLIPModel(hf_clip(text={"eos_token_id": eos})).eval()
    ref.save_pretrained(tmp_path / "hf")
    model, cfg, tok = load_hf_dir(tmp_path / "hf")
    assert isinstance(model, CLIP) and cfg.parts == "both" and cfg.eos_id == eos and tok is None
    ids, px = text_batch(98), pixels()
    if eos == 2:
        ids[0, 4] = 98  # the largest id is pooled, wherever the EOS is
    with torch.no_grad():
        mask = (ids != 1).long()
        out = ref(input_ids=ids, pixel_values=px, attention_mask=mask)
        assert close(model.embed_image(px), ref.get_image_features(pixel_values=px).pooler_output)[0]
        assert close(model.embed_text(ids), ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output)[0]
        logits = model(px, ids)
        assert close(logits, out.logits_per_image)[0] and close(logits.t(), out.logits_per_text)[0]
        assert close(contrastive_loss(logits), ref(input_ids=ids, pixel_values=px, return_loss=True).loss)[0]


def test_vision_and_text_models_import_parity(tmp_path):
    vis = tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION)).eval()
    txt = tf.CLIPTextModel(tf.CLIPTextConfig(**TEXT)).eval()
    vis.save_pretrained(tmp_path / "vision")
    txt.save_pretrained(tmp_path / "text")
    mv, cv, _ = load_hf_dir(tmp_path / "vision")
    mt, ct, _ = load_hf_dir(tmp_path / "text")
    assert (cv.parts, ct.parts) == ("vision", "text")
    assert mv.num_params() == sum(p.numel() for p in vis.parameters()) == cv.num_params()
    assert mt.num_params() == sum(p.numel() for p in txt.parameters()) == ct.num_params()
    px, ids = pixels(), text_batch()
    with torch.no_grad():
        assert close(mv.embed_image(px), vis(pixel_values=px).pooler_output)[0]
        assert close(mv.vision(px)[0], vis(pixel_values=px).last_hidden_state)[0]
        assert close(mt.embed_text(ids), txt(input_ids=ids).pooler_output)[0]
    with pytest.raises(LMForgeError, match="this CLIP model has no text tower \\(model.parts is 'vision'\\)"):
        mv.embed_text(ids)


@pytest.mark.parametrize("parts", ["both", "vision", "text"])
def test_export_loads_in_transformers_with_equal_outputs(tmp_path, parts):
    from lmforge.checkpoint import write_model_dir

    cfg = config_from_preset("clip-tiny", parts=parts, vocab_size=99, eos_id=98)
    model = CLIP(cfg).eval()
    write_model_dir(tmp_path / "run", model)
    convert_to_hf(tmp_path / "run", tmp_path / "hf")
    hf_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    arch = {"both": "CLIPModel", "vision": "CLIPVisionModel", "text": "CLIPTextModel"}[parts]
    assert hf_json["architectures"] == [arch]
    ref = getattr(tf, arch).from_pretrained(tmp_path / "hf").eval()
    px, ids = pixels(side=32), text_batch()
    with torch.no_grad():
        if parts == "both":
            out = ref(input_ids=ids, pixel_values=px)
            assert close(model(px, ids), out.logits_per_image)[0]
        elif parts == "vision":
            assert close(model.embed_image(px), ref(pixel_values=px).pooler_output)[0]
        else:
            assert close(model.embed_text(ids), ref(input_ids=ids).pooler_output)[0]
    convert_from_hf(tmp_path / "hf", tmp_path / "back")
    back, cfg2, _ = load_hf_dir(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    if parts != "text":
        pp = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
        assert (pp["size"], pp["crop_size"]) == ({"shortest_edge": 32}, {"height": 32, "width": 32})


# ---- sizes -------------------------------------------------------------------------------------

def test_parameter_counts_are_exact():
    """clip-vit-base-patch32 = 151,277,313 as CLIPModel, and every preset's count equals transformers'."""
    from lmforge.interop.clip import config_to_hf

    cfg = config_from_preset("clip-vit-base-patch32")
    assert cfg.num_params() == 151_277_313
    for name in PRESETS:
        cfg = config_from_preset(name)
        hf = config_to_hf(cfg, torch.float32)
        with torch.device("meta"):
            ref = tf.CLIPModel(tf.CLIPConfig(text_config=hf["text_config"], vision_config=hf["vision_config"],
                                             projection_dim=cfg.projection_dim))
            ours = CLIP(cfg)
        assert cfg.num_params() == ours.num_params() == sum(p.numel() for p in ref.parameters()), name


# ---- preprocessing -----------------------------------------------------------------------------

def _image(w: int, h: int, mode: str, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)


@pytest.mark.parametrize("w,h,mode", [(64, 64, "RGBA"), (97, 53, "RGB"), (40, 121, "RGB"), (300, 224, "RGBA")])
def test_preprocessing_equals_clip_image_processor(w, h, mode):
    from lmforge.data.images import preprocess

    image = _image(w, h, mode, seed=w)
    for resize, crop in ((224, 224), (40, 32)):
        proc = tf.CLIPImageProcessor(size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop})
        want = torch.from_numpy(np.asarray(proc(images=image, return_tensors="np")["pixel_values"]))
        got = preprocess([image], resize, crop, proc.image_mean, proc.image_std)
        assert got.shape == want.shape and close(got, want, 1e-5)[0], close(got, want, 1e-5)[1]


# ---- the loss ----------------------------------------------------------------------------------

def test_infonce_against_a_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3], [0.2, -0.4, 3.0]])
    rows = [-math.log(math.exp(logits[i, i]) / sum(math.exp(x) for x in logits[i])) for i in range(3)]
    cols = [-math.log(math.exp(logits[i, i]) / sum(math.exp(logits[j, i]) for j in range(3))) for i in range(3)]
    assert contrastive_loss(logits).item() == pytest.approx((sum(rows) / 3 + sum(cols) / 3) / 2, abs=1e-6)


def test_golden_objective_loss_equals_transformers_return_loss(tmp_path):
    """The clip objective's loss on a batch is CLIPModel(return_loss=True)'s (same weights), and the
    temperature is capped at 100 in training only."""
    from lmforge.train.clip import CLIPObjective

    ref = tf.CLIPModel(hf_clip()).eval()
    ref.save_pretrained(tmp_path / "hf")
    model, _, _ = load_hf_dir(tmp_path / "hf")
    batch = {"pixels": pixels(), "input_ids": text_batch()}
    loss, stats = CLIPObjective()(model, batch)
    with torch.no_grad():
        want = ref(input_ids=batch["input_ids"], pixel_values=batch["pixels"], return_loss=True)
    assert close(loss, want.loss, 1e-5)[0]
    assert stats["acc"].item() == (want.logits_per_image.argmax(-1) == torch.arange(3)).float().mean().item()
    assert stats["chance_acc"].item() == pytest.approx(1 / 3)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
        capped, _ = CLIPObjective()(model, batch)
        cos = model(batch["pixels"], batch["input_ids"]) / 500.0
    assert close(capped, contrastive_loss(100.0 * cos), 1e-5)[0] and not close(capped, contrastive_loss(500.0 * cos))[0]


# ---- training ----------------------------------------------------------------------------------

@pytest.fixture
def emoji_dir(tmp_path, monkeypatch):
    from emoji_fixtures import fake_pins
    from lmforge.data.emoji import build_emoji

    build_emoji(tmp_path / "emoji", from_file=fake_pins(monkeypatch, tmp_path), progress=False)
    return tmp_path / "emoji"


TRAIN = ["--train.objective", "clip", "--model.preset", "clip-tiny", "--train.max_steps", "8",
         "--train.micro_batch_size", "8", "--train.eval_every", "4", "--train.eval_iters", "2", "--train.ckpt_every", "4",
         "--train.progress", "false", "--train.lr", "3e-3", "--train.warmup_steps", "2", "--train.log_every", "1"]


def test_clip_objective_batches_are_distinct_pairs_of_a_pure_function(emoji_dir):
    from lmforge.data.image_text import ImageTextData
    from lmforge.train.clip import PairBatches, caption_ids, pixels_of

    data = ImageTextData(emoji_dir)
    train, tok = data.split("train"), data.tokenizer()
    cfg = config_from_preset("clip-tiny")
    px = pixels_of(train, cfg)
    assert px.shape == (len(train), 3, 32, 32)
    src = PairBatches(px, caption_ids(tok, train.captions(), 32), train.captions(), 8, seed=5, pad_id=tok.pad_id)
    a, b = src.micro_batch(3, 1), src.micro_batch(3, 1)
    assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], src.micro_batch(3, 0)["input_ids"])
    texts = [tok.decode(r, skip_special=True) for r in a["input_ids"].tolist()]
    assert len(set(texts)) == 8  # distinct captions: no false negatives
    ends = a["input_ids"].eq(0).int().argmax(-1)  # every row's EOS (id 0) sits after its caption
    assert all(a["input_ids"][i, :ends[i]].ne(0).all() for i in range(8))


def test_image_augment_views_are_random_valid_and_reproducible():
    from lmforge.data.images import augment

    cfg = config_from_preset("clip-tiny")
    mean, std = cfg.image_mean, cfg.image_std
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    img = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    img[:, :, :8] = 1.0  # a white band: the background colour
    px = (img - m) / s
    view = lambda seed, strength=1.0: augment(px, torch.Generator().manual_seed(seed), mean, std, strength)  # noqa: E731
    a = view(3)
    assert a.shape == px.shape and a.dtype == px.dtype
    assert torch.equal(a, view(3)) and not torch.equal(a, view(4))  # a function of the generator's state
    assert torch.equal(view(3, 0.0), px)  # strength 0: the pixels untouched
    rgb = a * s + m
    assert rgb.min() >= -1e-6 and rgb.max() <= 1 + 1e-6  # still pixels in [0, 1]
    assert all((a[i] - px[i]).abs().max() > 0.05 for i in range(6))  # every image gets its own view
    white = (torch.ones(4, 3, 32, 32) - m) / s  # a white image stays one flat colour (corners fill white)
    w = augment(white, torch.Generator().manual_seed(1), mean, std) * s + m
    assert (w - w.mean((2, 3), keepdim=True)).abs().max() < 1e-5
    weak = (view(3, 0.1) - px).abs().mean()
    assert weak < (a - px).abs().mean() / 2  # strength scales the ranges


def test_clip_pretraining_runs_and_resumes_bit_exactly(emoji_dir, tmp_path):
    import subprocess

    from safetensors.torch import load_file

    from lmforge.train.pretrain import run_training
    from train_fixtures import killed_cli

    train = [*TRAIN, "--objective.image_augment", "1"]  # random views, drawn per (seed, step, index) too
    full = run_training(str(emoji_dir), str(tmp_path / "full"), overrides=train)
    assert full["steps"] == 8 and full["val_ppl"] is None and full["val_loss"] < math.log(8) + 0.5
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["chance_acc"] == pytest.approx(1 / 8) and rows[0]["loss"] == pytest.approx(math.log(8), abs=0.1)
    # SIGKILL after step 4 (its checkpoint written), resume: same losses and weights as the run without a stop
    proc = subprocess.run(killed_cli(4, ["train", "--data", str(emoji_dir), "--out", str(tmp_path / "part"),
                                         "--threads", str(torch.get_num_threads()), *train]), capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_training(str(emoji_dir), str(tmp_path / "part"), overrides=train, resume="auto")

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert losses("full") == losses("part") and len(losses("full")) == 8
    wa = load_file(tmp_path / "full/checkpoints/step_00000008/model.safetensors")
    wb = load_file(tmp_path / "part/checkpoints/step_00000008/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and "logit_scale" in wa


def test_clip_objective_errors(emoji_dir, tmp_path):
    from lmforge.train.pretrain import run_training

    with pytest.raises(LMForgeError, match="train.objective clip trains both towers; model.parts is 'vision'"):
        run_training(str(emoji_dir), str(tmp_path / "r1"), overrides=TRAIN + ["--model.parts", "vision"])
    with pytest.raises(LMForgeError, match=r"model.eos_id \(5\) is not the tokenizer's EOS \(0\)"):
        run_training(str(emoji_dir), str(tmp_path / "r2"), overrides=TRAIN + ["--model.eos_id", "5"])
    with pytest.raises(LMForgeError, match=r"objective.image_augment must be >= 0 \(0 = no augmentation\), got -1.0"):
        run_training(str(emoji_dir), str(tmp_path / "r4"), overrides=TRAIN + ["--objective.image_augment", "-1"])
    with pytest.raises(LMForgeError, match="is not an image-text directory"):
        run_training(str(tmp_path), str(tmp_path / "r3"), overrides=TRAIN)


# ---- using a model: LLM and the CLI ------------------------------------------------------------

@pytest.fixture
def trained(emoji_dir, tmp_path):
    from lmforge.train.pretrain import run_training

    run_training(str(emoji_dir), str(tmp_path / "run"), overrides=TRAIN)
    return tmp_path / "run"


def test_llm_embed_image_embed_and_zero_shot(trained, emoji_dir):
    from lmforge import LLM
    from lmforge.data.images import preprocess

    llm = LLM.load(trained)
    assert llm.tasks == {"embed", "embed_image", "zero_shot"}
    paths = [emoji_dir / r["image"] for r in map(json.loads, (emoji_dir / "test_style.jsonl").read_text().splitlines()[:3])]
    img = llm.embed_image([str(p) for p in paths])
    cfg, model = llm.config, llm.model
    px = preprocess(paths, cfg.resize_size, cfg.image_size, cfg.image_mean, cfg.image_std)
    with torch.no_grad():
        want_img = torch.nn.functional.normalize(model.embed_image(px), dim=-1)
        labels = ["thing number 1", "thing number 2", "group 4"]
        ids = llm.tokenizer.batch(labels)["input_ids"]
        want_txt = torch.nn.functional.normalize(model.embed_text(ids), dim=-1)
        prompts = llm.tokenizer.batch([f"a picture of {x}" for x in labels])["input_ids"]
        prompt_txt = torch.nn.functional.normalize(model.embed_text(prompts), dim=-1)
    assert img.shape == (3, cfg.projection_dim) and close(img, want_img, 1e-6)[0]
    txt = llm.embed(labels)
    assert close(txt, want_txt, 1e-6)[0] and close(txt.norm(dim=-1), torch.ones(3), 1e-5)[0]
    assert close(llm.embed(labels, normalize=False).norm(dim=-1), model.embed_text(ids).norm(dim=-1).detach())[0]
    res = llm.zero_shot([str(p) for p in paths], labels)
    probs = (model.logit_scale.exp() * want_img @ prompt_txt.t()).softmax(-1).detach()
    for r, p in zip(res, probs):
        assert r["label"] == labels[int(p.argmax())] and r["score"] == pytest.approx(float(p.max()), abs=1e-6)
        assert list(r["probs"]) == labels and sum(r["probs"].values()) == pytest.approx(1.0)
    with pytest.raises(LMForgeError, match="a CLIP model pools its text at the EOS token; pooling cannot be chosen"):
        llm.embed(["x"], pooling="mean")
    with pytest.raises(LMForgeError, match="the template must hold '\\{\\}' where the label goes, got 'a picture'"):
        llm.zero_shot(paths[0], labels, template="a picture")
    with pytest.raises(LMForgeError, match="image file not found: nope.png"):
        llm.embed_image("nope.png")


def test_vision_only_model_refuses_text_tasks(tmp_path):
    from lmforge import LLM
    from lmforge.checkpoint import write_model_dir

    write_model_dir(tmp_path / "v", CLIP(config_from_preset("clip-tiny", parts="vision")))
    llm = LLM.load(tmp_path / "v")
    assert llm.tasks == {"embed_image"}
    with pytest.raises(LMForgeError, match="embed needs an encoder model .* or a CLIP model with a text tower"):
        llm.embed(["x"])
    with pytest.raises(LMForgeError, match="zero_shot needs a CLIP model with both towers; this is a clip model"):
        llm.zero_shot([], ["a"])


def test_cli_embed_image_and_classify_labels(trained, emoji_dir, capsys):
    from lmforge import LLM
    from lmforge.cli import main

    image = str(emoji_dir / json.loads((emoji_dir / "test_style.jsonl").read_text().splitlines()[0])["image"])
    assert main(["embed", str(trained), "thing number 1", "--image", image]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    llm = LLM.load(trained)
    assert [next(iter(x)) for x in lines] == ["image", "text"] and lines[0]["image"] == image
    assert close(torch.tensor(lines[0]["embedding"]), llm.embed_image(image)[0], 1e-6)[0]
    assert close(torch.tensor(lines[1]["embedding"]), llm.embed("thing number 1")[0], 1e-6)[0]
    assert main(["classify", str(trained), "--image", image, "--labels", "a cat, thing number 0,group 3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = llm.zero_shot(image, ["a cat", "thing number 0", "group 3"])[0]
    assert got["image"] == image and got["label"] == want["label"]
    assert got["probs"] == pytest.approx(want["probs"], abs=1e-6)
    assert main(["classify", str(trained), "--image", image, "--labels", "x,y", "--template", "an emoji of {}"]) == 0
    label, probs, path = capsys.readouterr().out.strip().split("\t")
    assert path == image and label in ("x", "y") and probs.startswith("x=")
    assert main(["classify", str(trained), "--image", image]) == 2
    assert "zero-shot image classification needs both --image FILE and --labels a,b,c" in capsys.readouterr().err


def test_v1_embeddings_serves_clip_text_embeddings(trained):
    import httpx

    from lmforge import LLM
    from lmforge.serve.app import create_app
    from lmforge.serve.config import ServerConfig
    from lmforge.serve.embeddings import EmbeddingEngine
    from serve_fixtures import NAME, ServerThread

    llm = LLM.load(trained)
    srv = ServerThread(create_app(ServerConfig(served_model_name=NAME), engine=EmbeddingEngine(llm)))
    try:
        texts = ["thing number 4", "group 2"]
        body = httpx.post(srv.url + "/v1/embeddings", json={"model": NAME, "input": texts}).json()
        got = torch.tensor([d["embedding"] for d in body["data"]])
        assert got.shape == (2, llm.config.projection_dim) and close(got, llm.embed(texts), 1e-6)[0]
        assert body["usage"]["prompt_tokens"] == sum(len(r) for r in llm.tokenizer.encode_pairs(texts)[0])
        r = httpx.post(srv.url + "/v1/embeddings", json={"model": NAME, "input": texts, "dimensions": 3})
        assert r.status_code == 400 and f"this model's embeddings have {llm.config.projection_dim}" in r.text
    finally:
        srv.stop()


def test_benchmark_quick_reports_every_figure_with_its_anchors(emoji_dir, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("clip_bench", Path(__file__).parents[1] / "benchmarks" / "clip.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    assert bench.main(["--quick", "--data", str(emoji_dir), "--out", str(tmp_path / "b"), "--threads", "1",
                       "--json", str(tmp_path / "clip.json"), "--picture", str(tmp_path / "ex.png")]) == 0
    torch.set_num_threads(threads)
    r = json.loads((tmp_path / "clip.json").read_text())
    n_emoji = len((emoji_dir / "emoji.jsonl").read_text().splitlines())
    for part in ("held_out_style", "held_out_emoji"):
        ret, cat = r[part]["retrieval"], r[part]["category_acc"]
        assert set(ret) == {"model", "pixel_nn", "chance", "candidates"} and ret["candidates"] == n_emoji
        assert ret["chance"] == {"r1": 1 / n_emoji, "r5": 5 / n_emoji}
        assert all(0 <= ret[k]["r1"] <= ret[k]["r5"] <= 1 for k in ("model", "pixel_nn"))
        assert set(cat) == {"zero_shot", "zero_shot_name", "pixel_nn", "chance", "majority"} and cat["chance"] == 1 / 9
    assert r["held_out_emoji"]["retrieval"]["pixel_nn"]["r1"] == 0  # its emoji are in no training image
    assert r["held_out_style"]["retrieval"]["pixel_nn"]["r1"] > 0.5  # the fake styles differ only slightly
    speed = r["speed"]["trained"]
    assert speed["max_abs_diff"] < 1e-4 and speed["lmforge_images_per_s"] > 0 and speed["speedup"] > 0
    assert r["steps"] == 4 and len(r["categories"]) == 9
    fit = r["training_images"]
    assert fit["images"] == len((emoji_dir / "train.jsonl").read_text().splitlines())
    assert 0 <= fit["retrieval"]["model"]["r1"] <= fit["retrieval"]["model"]["r5"] <= 1
    from PIL import Image

    with Image.open(tmp_path / "ex.png") as im:
        assert im.size == (1200, 160)
    # --skip-train evaluates the run already there, with the same figures
    assert bench.main(["--quick", "--skip-train", "--data", str(emoji_dir), "--out", str(tmp_path / "b"), "--threads", "1",
                       "--json", str(tmp_path / "again.json")]) == 0
    torch.set_num_threads(threads)
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["held_out_style"] == r["held_out_style"] and again["steps"] == 4 and again["trained_before"] is True


def test_cli_convert_both_ways_and_llm_load_of_a_hugging_face_folder(trained, tmp_path, capsys):
    from lmforge import LLM
    from lmforge.cli import main

    assert main(["convert", str(trained), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    capsys.readouterr()
    ref = tf.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    a, b, c = LLM.load(trained), LLM.load(tmp_path / "hf"), LLM.load(tmp_path / "back")
    assert b.tokenizer is not None and b.tokenizer.eos_id == a.config.eos_id == b.config.eos_id
    labels = ["thing number 1", "group 5"]
    assert torch.equal(a.embed(labels), b.embed(labels)) and torch.equal(a.embed(labels), c.embed(labels))
    ids = a.tokenizer.batch(labels)["input_ids"]
    with torch.no_grad():
        want = ref.get_text_features(input_ids=ids).pooler_output
    assert close(b.model.embed_text(ids), want)[0]
    assert b.config.resize_size == a.config.resize_size and b.config.image_mean == a.config.image_mean


def test_torchrun_two_processes_train_like_one_with_accumulation(emoji_dir, tmp_path):
    """torchrun (gloo, CPU): 2 processes x grad_accum 1 see the micro-batches of 1 process x grad_accum 2."""
    import os
    import subprocess

    from safetensors.torch import load_file

    from lmforge.train.pretrain import run_training
    from train_fixtures import PYTHON, REPO, read_metrics

    common = TRAIN[:TRAIN.index("--train.max_steps")] + ["--train.max_steps", "3", "--train.eval_every", "3",
                                                         "--train.micro_batch_size", "4", "--train.progress", "false",
                                                         "--train.warmup_steps", "1", "--train.ckpt_every", "3"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the float sums of the torchrun processes (one thread each)
    try:
        run_training(str(emoji_dir), str(tmp_path / "one"), overrides=common + ["--train.grad_accum", "2"])
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    two = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                          "lmforge.cli", "train", "--data", str(emoji_dir), "--out", str(tmp_path / "two"), *common,
                          "--train.grad_accum", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        key = "loss" if "loss" in ra else "val_loss"
        assert rb[key] == pytest.approx(ra[key], rel=1e-5)
    wa = load_file(str(tmp_path / "one/checkpoints/step_00000003/model.safetensors"))
    wb = load_file(str(tmp_path / "two/checkpoints/step_00000003/model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=2e-5)


def test_serving_a_vision_only_model_is_one_clear_error(tmp_path):
    import os
    import subprocess

    from lmforge.checkpoint import write_model_dir
    from serve_fixtures import REPO, free_port, lmforge

    write_model_dir(tmp_path / "v", CLIP(config_from_preset("clip-tiny", parts="vision")))
    r = subprocess.run(lmforge("serve", str(tmp_path / "v"), "--port", str(free_port())), cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == (f"error: {tmp_path / 'v'} is a clip model that neither generates nor embeds "
                                         "text (it can: embed_image); the server has nothing to serve it for")
