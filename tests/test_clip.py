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
