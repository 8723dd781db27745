"""What the face recipes share on the image side: which shard member holds the
image, and the resize / crop / flip / normalise pipeline around recipe-specific
augmentations."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torchvision import transforms

from models.pixels import IMAGENET_MEAN, IMAGENET_STD
from shards.reading import IMAGE_EXTS

# Member names tried in order: the built-in synthetic shards' visible image
# (vis.<ext>; never thz.png), a bare extension, then what `biomtl shards create`
# writes (image.<ext>: the original bytes keep their format) and face.<ext>.
# <ext> runs over the shard decoder's own list, so every image format the
# packer stores and the decoder reads is one the recipes accept.
IMAGE_STEMS = ("vis", "", "image", "face")
IMAGE_KEYS = tuple(f"{stem}.{ext}" if stem else ext for stem in IMAGE_STEMS for ext in IMAGE_EXTS)


class MissingImageError(KeyError):
    """A sample without a member the recipes read as its image: bad data (the
    stream counts it as a corrupt sample), with a message that says what the
    sample has and what was expected."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def expected_image_keys() -> str:
    stems = " or ".join(f"{s}.<ext>" if s else "<ext>" for s in IMAGE_STEMS)
    return f"{stems} with <ext> one of {', '.join(IMAGE_EXTS)}"


def pick_rgb_image(sample: Mapping[str, Any]):
    """The sample's image as RGB (grey scans are replicated to three channels)."""
    for key in IMAGE_KEYS:
        if key in sample:
            img = sample[key]
            return img if img.mode == "RGB" else img.convert("RGB")
    members = sorted(k for k in sample if not k.startswith("__"))
    raise MissingImageError(f"sample {sample.get('__key__')!r} has no image member: it has "
                            f"{', '.join(members) or 'no members'}; expected {expected_image_keys()}")


def face_transforms(img_size: int, augment: bool, crop_scale_min: float, p_flip: float,
                    extra: Sequence[Any] = ()) -> tuple[transforms.Compose, transforms.Compose]:
    """(train, eval) pipelines: eval resizes; train adds a mild random resized
    crop, a horizontal flip and the recipe's ``extra`` PIL augmentations when
    ``augment`` is on. Train ends in an 8-bit tensor (the network's
    :class:`models.pixels.PixelInput` normalises it on the training device, so
    workers hand over a quarter of the bytes); eval ends in ToTensor + ImageNet
    normalisation, the float input every evaluation path and picture expects."""
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
    return transforms.Compose([*train, transforms.PILToTensor()]), transforms.Compose([transforms.Resize(size), *norm])
