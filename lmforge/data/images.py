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


# YIQ: luma and two chroma axes; a hue shift is a rotation of (I, Q), saturation their scale.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def augment(pixels_BCHW: torch.Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float],
            strength: float = 1.0, *, min_area: float = 0.55, max_degrees: float = 15.0, flip: float = 0.5,
            brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.0,
            grey: float = 0.0) -> torch.Tensor:
    """Random views of normalised pixels (as `preprocess` makes them), one draw per image from `generator`:
    a random resized crop (area `min_area`..1 of the image, aspect 3/4..4/3, anywhere inside), a rotation
    of up to `max_degrees`, a horizontal flip with probability `flip`, colour jitter (brightness,
    contrast and saturation factors 1 +- their value, a hue shift of up to `hue` of a turn) and grey scale
    with probability `grey`. Hue and grey default to 0: a colour can be all that tells two emoji apart
    (red and green apples, the hearts). Uncovered corners are white, the background the preprocessing
    composites transparency onto. `strength` scales every range (0: the pixels unchanged).
    The same generator state gives the same views (exact resume)."""
    B, C, H, W = pixels_BCHW.shape
    if B == 0 or strength <= 0:
        return pixels_BCHW
    s = float(strength)
    u = torch.rand(B, 11, generator=generator)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    sd = torch.tensor(std, dtype=torch.float32)[:, None, None]
    x = pixels_BCHW.float() * sd + m - 1.0  # in [-1, 0]: white is 0, the grid's zero padding
    # geometry: the sampling grid of the crop, as an affine map of the output's [-1, 1] square
    area = 1 - (1 - min_area) * min(s, 1.0) * u[:, 0]
    log_ratio = (u[:, 1] * 2 - 1) * s * 0.2877  # ln(4/3)
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx = (u[:, 2] * 2 - 1) * (1 - sx)
    ty = (u[:, 3] * 2 - 1) * (1 - sy)
    angle = (u[:, 4] * 2 - 1) * s * (max_degrees * torch.pi / 180)
    mirror = torch.where(u[:, 5] < flip * min(s, 1.0), -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([sx * cos * mirror, -sy * sin, tx], 1),
                         torch.stack([sx * sin * mirror, sy * cos, ty], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, [B, C, H, W], align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1.0
    # colour: brightness, saturation and hue as one 3x3 map per image (in YIQ), then contrast
    bright = 1 + (u[:, 6] * 2 - 1) * brightness * s
    sat = (1 + (u[:, 7] * 2 - 1) * saturation * s) * (u[:, 8] >= grey * min(s, 1.0)).float()  # 0: grey
    turn = (u[:, 9] * 2 - 1) * hue * s * 2 * torch.pi
    contrast_f = 1 + (u[:, 10] * 2 - 1) * contrast * s
    zero, one = torch.zeros(B), torch.ones(B)
    yiq = torch.stack([torch.stack([one, zero, zero], 1),
                       torch.stack([zero, sat * turn.cos(), -sat * turn.sin()], 1),
                       torch.stack([zero, sat * turn.sin(), sat * turn.cos()], 1)], 1)
    M = bright[:, None, None] * (_YIQ_TO_RGB @ yiq @ _RGB_TO_YIQ)
    x = torch.einsum("bij,bjhw->bihw", M, x)
    luma = (x * _RGB_TO_YIQ[0][:, None, None]).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - luma) * contrast_f[:, None, None, None] + luma).clamp(0, 1)
    return ((x - m) / sd).to(pixels_BCHW.dtype)
