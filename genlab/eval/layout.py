"""Layout adherence of images drawn under a layout of boxes (the ControlNet box control, Zhang et al. 2023): the
objects are segmented as Shapes-GenEval segments them (`geneval.segment`: components of the non-background pixels),
and each control box is matched to the detected box of highest intersection over union (IoU, Everingham et al. 2010,
the PASCAL VOC overlap); a box no component overlaps scores 0. The mask IoU compares the union of the control boxes
(as `box_layout` rasterizes them) with the union of the components.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from genlab.eval.geneval import segment, to_uint8_hwc
from genlab.nn.controlnet import box_layout

Box = Sequence[float]


def box_iou(a: Box, b: Box) -> float:
    """|a n b| / |a u b| of two boxes (x0, y0, x1, y1) in continuous pixel coordinates; 0 for empty ones."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def layout_iou(images: Tensor | np.ndarray, layouts: Sequence[Sequence[Box]]) -> dict[str, Tensor]:
    """Per image: `box_iou`, the mean over its control boxes of the best IoU with a segmented component's box, and
    `mask_iou`, the IoU of the boxes' mask with the components' mask (1 where both are empty)."""
    imgs = to_uint8_hwc(images)
    if len(imgs) != len(layouts):
        raise ValueError(f"{len(imgs)} images for {len(layouts)} layouts")
    box_scores, mask_scores = [], []
    for img, boxes in zip(imgs, layouts, strict=True):
        comps = segment(img)
        found = [tuple(float(v) for v in box) for box, _ in comps]
        box_scores.append(float(np.mean([max((box_iou(b, f) for f in found), default=0.0) for b in boxes]))
                          if boxes else float(not found))
        want = box_layout(boxes, img.shape[0])[0].bool().numpy()
        got = np.zeros(img.shape[:2], dtype=bool)
        for _, mask in comps:
            got |= mask
        union = (want | got).sum()
        mask_scores.append(float((want & got).sum() / union) if union else 1.0)
    return {"box_iou": torch.tensor(box_scores), "mask_iou": torch.tensor(mask_scores)}
