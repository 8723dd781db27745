"""A sample's class labels, read once on the data path.

The losses skip labels outside ``[0, classes)`` with tensor ops (a compiled training
step has no branch on label values and never waits for the device), so the check that
a training label fits its classifier happens here, once per sample, in the transform:
a label the manifest cannot have (an identity index past its identity list, a posture
past the schema) raises ``ValueError``, which the shard stream counts as a corrupt
sample naming its shard (``data.max_corrupt_fraction`` then stops a run whose data and
manifest disagree). Evaluation reads labels unchecked: a model may be evaluated on
identities its classifier never saw."""
from __future__ import annotations

from typing import Any, Mapping, Sequence


def class_label(meta: Mapping[str, Any], keys: str | Sequence[str], classes: int, check: bool) -> int:
    """The first of ``keys`` present (not ``None``) in ``meta`` as an int, ``-1`` (unlabelled)
    when none is; with ``check``, a label ``>= classes`` raises ``ValueError``."""
    for key in ([keys] if isinstance(keys, str) else keys):
        value = meta.get(key)
        if value is None:
            continue
        label = int(value)
        if check and label >= classes:
            raise ValueError(f"label {key}={label} is outside the {classes} classes the manifest defines")
        return label
    return -1
