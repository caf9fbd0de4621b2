"""CLIP benchmark: a contrastive image-text model trained from scratch on the emoji data, evaluated on
the held-out style and the held-out emoji next to anchors measured in the same run, and its image
embedding throughput against transformers' CLIPVisionModel at equal weights.

Data: `lmforge data emoji` (emoji-datasource-* 16.0.0 from npm): train on three styles, test on the
fourth (test_style.jsonl) and on emoji never seen in any style (test_emoji.jsonl).
Training: `lmforge train --train.objective clip --model.preset clip-emoji` for --minutes of wall clock
(everything the run does; 2 threads).

Held-out style (every test image against the captions of ALL emoji, held-out ones included):
    retrieval_r1 / retrieval_r5   image -> text: the image's own caption ranked first / in the top 5
    zero_shot_category_acc        9 categories; a category's text embedding is the mean of those of its
                                  name and its subcategories' names (a prompt ensemble, no image labels)
    zero_shot_category_acc_name   the category name alone
    anchors: chance (1/N, 5/N, 1/9), the majority category, and pixel-space nearest neighbour to the
             training styles' images (the model's input pixels, L2): its emoji ranked by distance, its category
Held-out emoji: zero-shot category accuracy against the majority class (and the pixel anchor).
Training images: R@1 / R@5 of the images trained on, against the same captions (how well it fits what it saw).
Speed: images/s of LLM.embed_image's model call and of CLIPVisionModel (same weights, same pixels, fp32),
       at the trained model's shape and at ViT-B/32 (224 px), --threads threads; glibc malloc tuned for both.

    python benchmarks/clip.py [--data DIR] [--out runs/clip] [--minutes 9] [--threads 2] [--augment 1] [--picture PNG]
                              [--quick] [--skip-train] [--results PATH] [--json PATH]

--quick: a few steps of clip-tiny and the small speed shape only (tests). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LMFORGE = [sys.executable, "-m", "lmforge.cli"]


def log(msg: str) -> None:
    print(f"clip-bench: {msg}", file=sys.stderr, flush=True)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train(data: Path, run: Path, args: argparse.Namespace) -> float:
    if args.quick:
        budget = ["--model.preset", "clip-tiny", "--train.max_steps", "4", "--train.micro_batch_size", "8",
                  "--train.warmup_steps", "1", "--train.eval_every", "4", "--train.eval_iters", "1"]
    else:
        budget = ["--model.preset", args.preset, "--train.max_steps", "100000", "--train.max_minutes", str(args.minutes),
                  "--train.micro_batch_size", str(args.batch), "--train.warmup_steps", "100",
                  "--train.eval_every", "100000", "--train.eval_iters", "4"]
    cmd = LMFORGE + ["train", "--data", str(data), "--out", str(run), "--overwrite", "--threads", str(args.threads),
                     "--train.objective", "clip", "--train.lr", str(args.lr), "--train.ckpt_every", "100000",
                     "--train.progress", "false", "--objective.image_augment", str(args.augment), *budget]
    log(" ".join(cmd[2:]))
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return (time.time() - t0) / 60


def ranks(sim_NM: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target column (ties counted against it)."""
    return (sim_NM > sim_NM.gather(1, target_N[:, None])).sum(1)


def recall(rank_N: torch.Tensor) -> dict[str, float]:
    return {"r1": (rank_N < 1).float().mean().item(), "r5": (rank_N < 5).float().mean().item()}


def pixels(llm: Any, rows: list[dict], data: Path) -> torch.Tensor:
    from lmforge.data.images import preprocess

    cfg = llm.config
    return preprocess([data / r["image"] for r in rows], cfg.resize_size, cfg.image_size, cfg.image_mean, cfg.image_std)


def evaluate(llm: Any, data: Path) -> dict[str, Any]:
    index = read(data / "emoji.jsonl")
    train_rows, style_rows, held_rows = read(data / "train.jsonl"), read(data / "test_style.jsonl"), read(data / "test_emoji.jsonl")
    code_of = {e["code"]: i for i, e in enumerate(index)}
    categories = list(dict.fromkeys(e["category"] for e in index))
    subcats = {c: sorted({e["subcategory"] for e in index if e["category"] == c}) for c in categories}
    with torch.inference_mode():
        text_ND = llm.embed([e["caption"] for e in index], batch_size=256)
        name_CD = llm.embed([c.lower() for c in categories])
        ens_CD = torch.stack([F.normalize(llm.embed([c.lower(), *[s.replace("-", " ") for s in subcats[c]]]).mean(0), dim=0)
                              for c in categories])
        train_px = pixels(llm, train_rows, data).flatten(1)
    train_emoji = torch.tensor([code_of[r["code"]] for r in train_rows])
    train_emoji_cats = Counter(e["category"] for e in index if e["split"] == "train")
    majority = train_emoji_cats.most_common(1)[0][0]

    def scored(rows: list[dict]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's retrieval and zero-shot category figures on `rows`."""
        with torch.inference_mode():
            img_MD = llm.embed_image([data / r["image"] for r in rows], batch_size=256)
        target = torch.tensor([code_of[r["code"]] for r in rows])
        cat = torch.tensor([categories.index(r["category"]) for r in rows])
        return ({"model": recall(ranks(img_MD @ text_ND.t(), target))},
                {"zero_shot": ((img_MD @ ens_CD.t()).argmax(1) == cat).float().mean().item(),
                 "zero_shot_name": ((img_MD @ name_CD.t()).argmax(1) == cat).float().mean().item()})

    def part(rows: list[dict]) -> dict[str, Any]:
        """The model's figures on test rows, with the anchors beside them."""
        retrieval, category = scored(rows)
        with torch.inference_mode():
            px = pixels(llm, rows, data).flatten(1)
        target = torch.tensor([code_of[r["code"]] for r in rows])
        cat = torch.tensor([categories.index(r["category"]) for r in rows])
        # pixel nearest neighbour: each emoji's distance = its nearest training image's
        dist_MT = torch.cdist(px, train_px)
        emoji_dist = torch.full((len(rows), len(index)), float("inf"))
        emoji_dist.scatter_reduce_(1, train_emoji[None].expand(len(rows), -1), dist_MT, reduce="amin")
        nn_cat = torch.tensor([categories.index(train_rows[j]["category"]) for j in dist_MT.argmin(1).tolist()])
        n = len(index)
        return {
            "images": len(rows),
            "retrieval": {**retrieval, "pixel_nn": recall(ranks(-emoji_dist, target)),
                          "chance": {"r1": 1 / n, "r5": 5 / n}, "candidates": n},
            "category_acc": {**category, "pixel_nn": (nn_cat == cat).float().mean().item(),
                             "chance": 1 / len(categories),
                             "majority": sum(r["category"] == majority for r in rows) / len(rows)},
        }

    # the training images themselves (no anchors: each is its own pixel neighbour): how much of what it saw it fits
    fit_retrieval, fit_category = scored(train_rows)
    return {"held_out_style": part(style_rows), "held_out_emoji": part(held_rows),
            "training_images": {"images": len(train_rows), "retrieval": fit_retrieval,
                                "category_acc": {"zero_shot": fit_category["zero_shot"]}},
            "categories": categories, "majority_category": majority}


def throughput(cfg_kw: dict, side: int, batch: int, reps: int) -> dict[str, float]:
    """images/s of lmforge's vision tower and of transformers' CLIPVisionModel, the same weights and pixels."""
    import transformers as tf

    from lmforge.interop.hf import load_hf_dir

    torch.manual_seed(0)
    ref = tf.CLIPVisionModel(tf.CLIPVisionConfig(**cfg_kw)).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours, _, _ = load_hf_dir(d)
    px = torch.randn(batch, 3, side, side)

    def best(f) -> float:
        f()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return batch / min(times)

    with torch.inference_mode():
        err = (ours.embed_image(px) - ref(pixel_values=px).pooler_output).abs().max().item()
        lm, hf = best(lambda: ours.embed_image(px)), best(lambda: ref(pixel_values=px).pooler_output)
    return {"lmforge_images_per_s": lm, "transformers_images_per_s": hf, "speedup": lm / hf, "max_abs_diff": err,
            "batch": batch, "image_size": side}


def picture(llm: Any, data: Path, path: Path, n: int = 6) -> None:
    """A few held-out-style images with their top-3 predicted names (the README's picture)."""
    from PIL import Image, ImageDraw

    index = read(data / "emoji.jsonl")
    rows = read(data / "test_style.jsonl")
    rows = [rows[int(i * len(rows) / n)] for i in range(n)]
    with torch.inference_mode():
        sims = llm.embed_image([data / r["image"] for r in rows]) @ llm.embed([e["caption"] for e in index]).t()
    canvas = Image.new("RGB", (n * 200, 160), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (r, s) in enumerate(zip(rows, sims)):
        with Image.open(data / r["image"]) as im:
            canvas.paste(im.convert("RGBA"), (i * 200 + 68, 8), im.convert("RGBA"))
        for k, j in enumerate(s.topk(3).indices.tolist()):
            name = index[j]["name"][:28]
            draw.text((i * 200 + 6, 80 + 16 * k), f"{k + 1}. {name}", fill="green" if index[j]["code"] == r["code"] else "black")
        draw.text((i * 200 + 6, 136), f"true: {r['name'][:24]}", fill="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    from lmforge.bench.machine import tune_malloc
    from lmforge.bench.results import add_results_flag, publish

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="an emoji data directory (default: OUT/data, built with lmforge data emoji)")
    p.add_argument("--out", default=str(ROOT / "runs" / "clip"))
    p.add_argument("--preset", default="clip-emoji")
    p.add_argument("--minutes", type=float, default=9.0, help="training wall-clock budget (everything the run does)")
    p.add_argument("--batch", type=int, default=128, help="pairs per micro-batch (the contrastive batch)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--augment", type=float, default=1.0, help="objective.image_augment: strength of the random views (0: none)")
    p.add_argument("--picture", help="write the held-out examples picture here (PNG)")
    p.add_argument("--json", help="also write the JSON here")
    p.add_argument("--quick", action="store_true", help="a few training steps, the small speed shape only")
    p.add_argument("--skip-train", action="store_true", help="evaluate the model already trained in OUT/run")
    add_results_flag(p, "clip")
    args = p.parse_args(argv)
    start = time.time()
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    if not (data / "meta.json").is_file():
        from lmforge.data.emoji import build_emoji

        build_emoji(data, overwrite=True)
    if args.skip_train:  # evaluate OUT/run as trained before: its minutes from its log, its settings from its config
        import yaml

        rows = read(out / "run" / "metrics.jsonl")
        minutes = max(r.get("elapsed", 0) for r in rows) / 60
        cfg = yaml.safe_load((out / "run" / "config.yaml").read_text())
        args.augment = cfg["objective"]["image_augment"]
        args.batch, args.lr = cfg["train"]["micro_batch_size"], cfg["train"]["lr"]
        args.preset = cfg["model"].get("preset", args.preset)
    else:
        minutes = train(data, out / "run", args)
    torch.set_num_threads(args.threads)
    tune_malloc()  # for both frameworks alike
    from lmforge import LLM

    llm = LLM.load(out / "run")
    result: dict[str, Any] = {"train_minutes": round(minutes, 2), "trained_before": args.skip_train,
                              "threads": args.threads, "image_augment": args.augment,
                              "batch": args.batch, "lr": args.lr,
                              "preset": "clip-tiny" if args.quick else args.preset,
                              "params": llm.model.num_params(), "steps": json.loads(
                                  (out / "run" / "metrics.jsonl").read_text().splitlines()[-1]).get("step")}
    result.update(evaluate(llm, data))
    cfg = llm.config
    shapes = {"trained": (dict(hidden_size=cfg.vision_n_embd, intermediate_size=cfg.vision_mlp_hidden,
                               num_hidden_layers=cfg.vision_n_layer, num_attention_heads=cfg.vision_n_head,
                               image_size=cfg.image_size, patch_size=cfg.patch_size), cfg.image_size, 256)}
    if not args.quick:
        shapes["vit_base_patch32"] = ({}, 224, 32)
    result["speed"] = {name: throughput(kw, side, batch, 2 if args.quick else 5) for name, (kw, side, batch) in shapes.items()}
    if args.picture:
        picture(llm, data, Path(args.picture))
    publish("clip", result, json_path=args.json, results=args.results, wall_s=time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
