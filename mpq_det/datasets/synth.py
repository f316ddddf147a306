"""Deterministic synthetic detection data in PASCAL VOC layout plus COCO json.

The same JPEG files are described twice: VOC xml (VOCdevkit/VOC2007) for
VOCDataset/VOCMetric and COCO json (annotations/) for CocoDataset/CocoMetric.
Objects are filled shapes with random colours and textures, 1..8 per image, sizes
spanning more than 8x, drawn in order so later ones partly occlude earlier ones,
over a cluttered, noisy background, so that small detectors do not saturate.
"""
from __future__ import annotations

import json
import os
import os.path as osp
from dataclasses import dataclass
from xml.etree import ElementTree as ET

import cv2
import numpy as np

CLASSES = ('circle', 'square', 'triangle', 'cross', 'ring', 'star', 'diamond', 'hexagon')


@dataclass
class SynthSpec:
    num_train: int = 1600
    num_test: int = 500
    min_size: int = 160
    max_size: int = 256
    min_obj: int = 12          # object extent in px; max/min = 8.3x
    max_obj: int = 100
    max_objects: int = 8
    seed: int = 0


def _polygon(cls: str, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    if cls == 'triangle':
        ang = rot + np.arange(3) * 2 * np.pi / 3
        rad = np.full(3, r)
    elif cls == 'star':
        ang = rot + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    elif cls == 'diamond':
        ang = rot + np.arange(4) * np.pi / 2
        rad = np.array([r, 0.6 * r, r, 0.6 * r])
    elif cls == 'hexagon':
        ang = rot + np.arange(6) * np.pi / 3
        rad = np.full(6, r)
    else:  # square
        ang = rot + np.pi / 4 + np.arange(4) * np.pi / 2
        rad = np.full(4, r)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)


def _draw_object(img: np.ndarray, cls: str, cx: float, cy: float, r: float,
                 rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Draws one object and returns its tight box (x0, y0, x1, y1), clipped."""
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    rot = rng.uniform(0, 2 * np.pi) if cls not in ('square',) else rng.uniform(-0.3, 0.3)
    s = 16  # sub-pixel precision for cv2 drawing
    if cls == 'circle':
        cv2.circle(mask, (int(cx * s), int(cy * s)), int(r * s), 1, -1, cv2.LINE_AA, 4)
    elif cls == 'ring':
        cv2.circle(mask, (int(cx * s), int(cy * s)), int(r * s), 1, max(2, int(0.35 * r)), cv2.LINE_AA, 4)
    elif cls == 'cross':
        t = max(2, int(0.35 * r))
        for a in (rot, rot + np.pi / 2):
            p0 = (int((cx - r * np.cos(a)) * s), int((cy - r * np.sin(a)) * s))
            p1 = (int((cx + r * np.cos(a)) * s), int((cy + r * np.sin(a)) * s))
            cv2.line(mask, p0, p1, 1, t, cv2.LINE_AA, 4)
    else:
        pts = (_polygon(cls, cx, cy, r, rot) * s).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1, cv2.LINE_AA, 4)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0, 0, 0, 0)
    colour = rng.integers(30, 256, 3)
    texture = rng.normal(0, rng.uniform(0, 25), (h, w, 1))
    fill = np.clip(colour[None, None, :] + texture, 0, 255)
    m = mask.astype(bool)
    img[m] = fill[m]
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w if rng.random() < 0.5 else h)
    grad = c0[None, :] * (1 - t[:, None]) + c1[None, :] * t[:, None]
    img = np.broadcast_to(grad[None] if len(t) == w else grad[:, None], (h, w, 3)).astype(np.float32).copy()
    # clutter: lines and blobs that are not objects
    for _ in range(rng.integers(3, 12)):
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.6:
            p0 = tuple(int(v) for v in rng.integers(0, (w, h)))
            p1 = tuple(int(v) for v in rng.integers(0, (w, h)))
            cv2.line(img, p0, p1, col, int(rng.integers(1, 4)))
        else:
            c = tuple(int(v) for v in rng.integers(0, (w, h)))
            axes = (int(rng.integers(2, 9)), int(rng.integers(2, 9)))
            cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, col, -1)
    return img


def _make_image(idx: int, spec: SynthSpec, rng: np.random.Generator):
    h = int(rng.integers(spec.min_size, spec.max_size + 1))
    w = int(rng.integers(spec.min_size, spec.max_size + 1))
    img = _background(h, w, rng)
    objects = []
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        # log-uniform sizes so that small objects are as common as large ones
        size = float(np.exp(rng.uniform(np.log(spec.min_obj), np.log(min(spec.max_obj, 0.8 * min(h, w))))))
        r = size / 2
        cx, cy = rng.uniform(r * 0.6, w - r * 0.6), rng.uniform(r * 0.6, h - r * 0.6)
        label = int(rng.integers(len(CLASSES)))
        box = _draw_object(img, CLASSES[label], cx, cy, r, rng)
        if box[2] - box[0] >= 4 and box[3] - box[1] >= 4:
            objects.append((label, box))
    img += rng.normal(0, rng.uniform(3, 18), img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img, objects


def _voc_xml(name: str, w: int, h: int, objects) -> ET.ElementTree:
    root = ET.Element('annotation')
    ET.SubElement(root, 'folder').text = 'VOC2007'
    ET.SubElement(root, 'filename').text = f'{name}.jpg'
    size = ET.SubElement(root, 'size')
    for k, v in (('width', w), ('height', h), ('depth', 3)):
        ET.SubElement(size, k).text = str(v)
    for label, (x0, y0, x1, y1) in objects:
        obj = ET.SubElement(root, 'object')
        ET.SubElement(obj, 'name').text = CLASSES[label]
        ET.SubElement(obj, 'pose').text = 'Unspecified'
        ET.SubElement(obj, 'truncated').text = '0'
        ET.SubElement(obj, 'difficult').text = '0'
        bb = ET.SubElement(obj, 'bndbox')
        # 1-based like VOC; mmdet's VOCDataset subtracts 1 from all four, which gives
        # back exactly the box the COCO json holds
        for k, v in (('xmin', x0 + 1), ('ymin', y0 + 1), ('xmax', x1 + 1), ('ymax', y1 + 1)):
            ET.SubElement(bb, k).text = str(int(v))
    return ET.ElementTree(root)


def make_synth_dataset(out_dir: str, spec: SynthSpec | None = None, log=print) -> dict:
    """Writes the dataset under ``out_dir`` and returns counts. Deterministic in spec.seed."""
    spec = spec or SynthSpec()
    voc = osp.join(out_dir, 'VOCdevkit', 'VOC2007')
    for sub in ('JPEGImages', 'Annotations', osp.join('ImageSets', 'Main')):
        os.makedirs(osp.join(voc, sub), exist_ok=True)
    os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
    categories = [dict(id=i + 1, name=c, supercategory='shape') for i, c in enumerate(CLASSES)]
    counts = {}
    for split, n, offset, set_name, coco_name in (
            ('train', spec.num_train, 0, 'trainval', 'instances_train.json'),
            ('test', spec.num_test, spec.num_train, 'test', 'instances_val.json')):
        images, anns, names = [], [], []
        for i in range(n):
            idx = offset + i
            # one generator per image: any image can be regenerated on its own
            rng = np.random.default_rng([spec.seed, idx])
            img, objects = _make_image(idx, spec, rng)
            name = f'{idx:06d}'
            names.append(name)
            cv2.imwrite(osp.join(voc, 'JPEGImages', f'{name}.jpg'), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
            h, w = img.shape[:2]
            _voc_xml(name, w, h, objects).write(osp.join(voc, 'Annotations', f'{name}.xml'))
            images.append(dict(id=idx, file_name=f'{name}.jpg', width=w, height=h))
            for label, (x0, y0, x1, y1) in objects:
                anns.append(dict(id=len(anns) + 1 + offset * 10, image_id=idx, category_id=label + 1,
                                 bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0), iscrowd=0))
        with open(osp.join(voc, 'ImageSets', 'Main', f'{set_name}.txt'), 'w') as f:
            f.write('\n'.join(names) + '\n')
        with open(osp.join(out_dir, 'annotations', coco_name), 'w') as f:
            json.dump(dict(images=images, annotations=anns, categories=categories), f)
        counts[split] = dict(images=n, objects=len(anns))
        log(f'{split}: {n} images, {len(anns)} objects')
    with open(osp.join(out_dir, 'SPEC.json'), 'w') as f:
        json.dump(spec.__dict__, f)
    return counts


def ensure_synth_dataset(out_dir: str, spec: SynthSpec | None = None, force: bool = False,
                         log=print) -> bool:
    """Writes the dataset unless ``out_dir`` already holds this spec's (its SPEC.json
    is written last, so an interrupted run is redone). Returns whether it wrote."""
    spec = spec or SynthSpec()
    done = osp.join(out_dir, 'SPEC.json')
    if not force and osp.exists(done):
        with open(done) as f:
            if json.load(f) == spec.__dict__:
                log(f'{out_dir} already holds this dataset ({spec}); use --force to rewrite')
                return False
    make_synth_dataset(out_dir, spec, log)
    return True
