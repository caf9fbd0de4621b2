"""Images to the pixel tensors a CLIP vision tower reads, as transformers' `CLIPImageProcessor` makes them.

    pixels = preprocess(images, resize=224, crop=224, mean=..., std=...)   # (B, 3, crop, crop) float32

Per image, in transformers' order (its PIL backend, which is what it uses without torchvision):
  1. RGB: an image with transparency is composited onto white first;
  2. resize so the shortest side is `resize` (the long side int(resize * long / short)), bicubic with
     PIL's antialiasing filter (Image.resize, resample BICUBIC), kept as uint8;
  3. centre crop to crop x crop (top = (height - crop) // 2, left likewise);
  4. rescale to [0, 1] (in float64, then float32) and normalise per channel: (x - mean) / std.
Images are PIL images or paths of image files; a file that is not an image is one LMForgeError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lmforge.errors import LMForgeError


def open_image(image: Any) -> Any:
    """A PIL image from a PIL image or a path."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise LMForgeError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return im
        except (UnidentifiedImageError, OSError) as e:
            raise LMForgeError(f"{path} is not an image lmforge can read ({e})") from None
    raise LMForgeError(f"an image is a PIL image or a file path, got {type(image).__name__}")


def to_rgb(image: Any) -> Any:
    """RGB, transparency composited onto white (as transformers' convert_to_rgb)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_crop(image: Any, resize: int, crop: int) -> np.ndarray:
    """uint8 (crop, crop, 3): shortest side to `resize` (bicubic), then the centre crop."""
    from PIL import Image

    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    a = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    return a[top:top + crop, left:left + crop]


def preprocess(images: Sequence[Any], resize: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, crop, crop) float32 pixels of `images` (PIL images or paths)."""
    if resize < crop:
        raise LMForgeError(f"the resize ({resize}) must be at least the crop ({crop})")
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    out = []
    for image in images:
        a = resize_crop(to_rgb(open_image(image)), resize, crop).transpose(2, 0, 1)
        x = (a.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append((x - m) / s)
    if not out:
        return torch.zeros(0, len(mean), crop, crop)
    return torch.from_numpy(np.stack(out))
