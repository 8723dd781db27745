"""One sample of any mode: the face renderer (:mod:`shards.synthetic.faces`) or, when
``spec.base_faces > 0``, the many-identities mode (:mod:`shards.synthetic.many`, which
draws its base faces with the former)."""
from __future__ import annotations

from typing import Any

from .faces import render_face
from .many import render_many
from .spec import SyntheticSpec


def render_sample(spec: SyntheticSpec, identity: int, index: int) -> dict[str, Any]:
    """Draw sample ``index`` of ``identity``: :func:`render_face`'s dict (``vis``,
    ``vis_target``, ``thz``, ``thz_dense``, ``thz_target``, ``albedo``, ``normal``,
    ``depth``, ``labels``, ``index``), or in the many-identities mode ``vis``,
    ``labels`` and ``index`` (:func:`render_many`)."""
    return render_many(spec, identity, index) if spec.base_faces else render_face(spec, identity, index)
