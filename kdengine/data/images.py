"""Images through the vision tower's own image processor, with optional pad-to-square."""

from __future__ import annotations

import torch
from PIL import Image


def processor_background(image_processor) -> tuple[int, int, int]:
    """The processor's normalisation mean as an RGB colour in 0..255 (pads to 0 after normalising)."""
    mean = getattr(image_processor, "image_mean", None)
    if mean is None or len(mean) != 3:
        raise ValueError(f"image processor {type(image_processor).__name__} has image_mean={mean!r}: expected 3 values")
    return tuple(int(round(255 * m)) for m in mean)


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad ``image`` to a square of side max(W, H), centred, filled with ``background`` (LLaVA-1.5)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def process_images(images: list[Image.Image], image_processor, pad_to_square: bool = False) -> torch.Tensor:
    """Run RGB images through ``image_processor`` (e.g. a SiglipImageProcessor).

    Args:
        images: n PIL RGB images of any sizes.
        image_processor: a transformers image processor; called as
            ``image_processor(images=..., return_tensors="pt")``.
        pad_to_square: pad each image to a square with the processor's mean colour first.

    Returns:
        pixel_values: Float[n, 3, H, W], H and W fixed by the processor.
    """
    if not images:
        raise ValueError("process_images got no images: expected at least one")
    if pad_to_square:
        bg = processor_background(image_processor)
        images = [expand_to_square(im, bg) for im in images]
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[0] != len(images):
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"image processor returned pixel_values {shape}: expected ({len(images)}, 3, H, W)")
    return pixel_values.float()
