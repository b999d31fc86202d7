"""Grad-CAM picture of where a model grounds an expression in an image, for any checkpoint.

    python -m finetune.visualize_grounding --checkpoint refcoco.pth --image photo.jpg \
        --text "the man in the red shirt" --out overlay.png                     # base model, itm, layer 8
    python -m finetune.visualize_grounding --checkpoint runs/g/final.pth --model tiny --block-num 3 \
        --image img.jpg --text "the red circle" --out o.png \
        --box 10 12 20 20 --box 40 5 18 18 --true-box 10 12 20 20             # score proposals, mark the best

The model is an ``ALBEFRetrieval`` of preset/YAML ``--model`` (``--set key=value`` overrides its fields) loaded
with ``albef.models.convert.load_pretrained`` (official ``ALBEF.pth``/``refcoco.pth``, our ``final.pth``/``best.pth``
exports, DeepSpeed model states; the feature queues, training state only, are ignored); the image size is read
from the checkpoint's position embedding unless ``--image-res`` is given. ``--mode itm`` (official) takes Grad-CAM
of the ITM match logit on the cross-attention of fusion layer ``--block-num``; ``--mode itc`` of the ITC
similarity on ViT block ``--block-num``. The heat map is upsampled to the image's own size and blended in; with
``--box`` proposals the best one (heat mass / sqrt(area), as the grounding evaluation) is drawn in magenta,
``--true-box`` in green. Prints a JSON summary; errors (a missing layer, a checkpoint that does not fit the
model) exit with code 2 and a message naming the option or keys.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import List, Optional

import torch
from PIL import Image


def _image_res_from_checkpoint(sd, patch_size: int, path: str) -> int:
    pos = sd.get("visual_encoder.pos_embed")
    if pos is None:
        raise ValueError(f"{path}: no visual_encoder.pos_embed; pass --image-res")
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise ValueError(f"{path}: visual_encoder.pos_embed {tuple(pos.shape)} is not a square grid; pass --image-res")
    return grid * patch_size


def run(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m finetune.visualize_grounding", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="model weights (any layout albef.models.convert reads)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--text", required=True, help="referring expression")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--model", default="base", help="model preset (tiny, small, base) or YAML path (default: base)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model config override, e.g. --set text.fusion_layer=6 (repeatable)",
    )
    p.add_argument("--mode", choices=["itm", "itc"], default="itm", help="Grad-CAM target (default: itm, official)")
    p.add_argument(
        "--block-num", type=int, default=8, help="itm: fusion layer index; itc: ViT block index (default: 8, official)"
    )
    p.add_argument("--image-res", type=int, default=0, help="model input size (default: from the checkpoint)")
    p.add_argument(
        "--box",
        action="append",
        nargs=4,
        type=float,
        default=[],
        metavar=("X", "Y", "W", "H"),
        help="a proposal box in image pixels (repeatable); the best-scoring one is drawn",
    )
    p.add_argument("--true-box", nargs=4, type=float, default=None, metavar=("X", "Y", "W", "H"))
    p.add_argument("--alpha", type=float, default=0.6, help="heat-map opacity at the hottest pixel")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)

    from albef.data.transforms import stack_images, test_transform, to_device
    from albef.eval.grounding import box_iou, check_block, gradcam, select_box, upsample_map
    from albef.models import build_model, model_config
    from albef.models.convert import QUEUE_KEYS, load_pretrained, read_state_dict
    from albef.tokenizer import Tokenizer, pre_caption
    from albef.viz import save_overlay

    # The feature queues are training state, unused here: dropped, so a checkpoint loads whatever its queue size.
    sd = {k: v for k, v in read_state_dict(a.checkpoint).items() if k not in QUEUE_KEYS + ("idx_queue",)}
    cfg = model_config(a.model, a.overrides)
    res = a.image_res or _image_res_from_checkpoint(sd, cfg.vision.patch_size, a.checkpoint)
    if res != cfg.vision.img_size:
        cfg = model_config(a.model, [*a.overrides, f"vision.img_size={res}"])
    check_block(cfg, a.mode, a.block_num)
    model = build_model(cfg, "retrieval")
    load_pretrained(model, sd)
    device = torch.device(a.device)
    model.to(device).eval()

    data = Path(a.image).read_bytes()
    pixels = to_device(stack_images([test_transform(res)(data, None)]), device, torch.float32)
    text = pre_caption(a.text)
    tokens = Tokenizer()([text], max_length=cfg.text.max_position_embeddings)
    cam = gradcam(
        model, pixels, tokens["input_ids"].to(device), tokens["attention_mask"].to(device), a.mode, a.block_num
    )[0].cpu()
    with Image.open(a.image) as im:
        image = im.convert("RGB")
    heat = upsample_map(cam, (image.height, image.width))

    summary = {
        "out": a.out,
        "text": text,
        "mode": a.mode,
        "block_num": a.block_num,
        "image_res": res,
        "grid": list(cam.shape),
        "image_size": [image.width, image.height],
    }
    pred = None
    label = text
    if a.box:
        best, scores = select_box(heat, a.box)
        pred = a.box[best]
        summary.update(pred_box=pred, scores=[float(s) for s in scores])
    if a.true_box is not None and pred is not None:
        summary["iou"] = box_iou(pred, a.true_box)
        label += f" | IoU {summary['iou']:.2f}"
    save_overlay(a.out, image, heat, pred_box=pred, true_box=a.true_box, label=label, alpha=a.alpha)
    print(json.dumps(summary))
    return summary


def main() -> None:
    from albef.models.convert import CheckpointError

    try:
        run()
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
