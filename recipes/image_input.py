"""What the face recipes share on the image side: which shard member holds the
image, and the resize / crop / flip / normalise pipeline around recipe-specific
augmentations."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torchvision import transforms

# Tried in order: the built-in synthetic shards, then what `biomtl shards create`
# writes for folder / cmu / facecom sources (original bytes keep their extension).
IMAGE_KEYS = ("vis.png", "png", "jpg", "jpeg", "pgm", "image.png", "image.jpg", "image.jpeg", "image.pgm",
              "face.png", "face.jpg", "bmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pick_rgb_image(sample: Mapping[str, Any]):
    """The sample's image as RGB (grey scans are replicated to three channels)."""
    for key in IMAGE_KEYS:
        if key in sample:
            img = sample[key]
            return img if img.mode == "RGB" else img.convert("RGB")
    raise KeyError(f"sample {sample.get('__key__')!r} has no image (looked for {IMAGE_KEYS}; has {sorted(sample)})")


def face_transforms(img_size: int, augment: bool, crop_scale_min: float, p_flip: float,
                    extra: Sequence[Any] = ()) -> tuple[transforms.Compose, transforms.Compose]:
    """(train, eval) pipelines: eval resizes; train adds a mild random resized
    crop, a horizontal flip and the recipe's ``extra`` PIL augmentations when
    ``augment`` is on. Both end in ToTensor + ImageNet normalisation."""
    size = (img_size, img_size)
    norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train: list[Any] = []
    if augment and crop_scale_min < 1.0:
        train.append(transforms.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), ratio=(0.9, 1.1)))
    else:
        train.append(transforms.Resize(size))
    if augment:
        if p_flip > 0:
            train.append(transforms.RandomHorizontalFlip(p_flip))
        train.extend(extra)
    return transforms.Compose([*train, *norm]), transforms.Compose([transforms.Resize(size), *norm])
