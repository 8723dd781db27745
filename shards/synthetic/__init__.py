"""The built-in synthetic biometric dataset.

Faces are drawn procedurally (NumPy only, no GPU, deterministic by seed):
each identity has a latent face geometry (face outline and jaw, eyes, brows,
nose, mouth, ears, skin tone, hair, moles) from which a height field and an
albedo map are evaluated on a pixel grid; the visible image is the albedo lit
by a per-sample light through the normals of the height field. So the same
code gives the photometric-stereo maps (albedo, unit normals, depth) and a
THz-like rendering of the same capture (frontal illumination, blurred, low
contrast, fabric nearly transparent).

Modalities (``SyntheticSpec.modalities``, :data:`MODALITIES`): ``vis``
(``vis.png``), ``vis_target`` (``vis_target.png``: the same capture without
the concealment), ``thz`` (``thz.png`` through thin fabric + ``thz_target.png``
unconcealed), ``thz_dense`` (``thz.png`` through dense fabric that hides most
of the lower face + ``thz_target.png``; the THz recipes' default, since thin
fabric leaves nothing to reconstruct), ``maps`` (albedo / normal / depth) and
``ear`` (``ear.png``: a parametric ear of the identity, posed, lit and partly
occluded, somewhere inside a larger image; its box in the json as ``ear_bbox``
``[x1, y1, x2, y2]``, x2/y2 exclusive; :func:`render_ear`).
Adding a modality never changes the bytes of the others for the same spec.

Per sample: one of five head postures (the face frame is rotated in 3D and
the image is ray-traced back onto the height field), an emotion (mouth curve,
brows, eye opening), spectacles, concealment (a scarf or mask over the lower
face), and jitter (pose, scale, shift, light, colour, noise). Twins share their
latent face and differ in small details (``twin_style``: "subtle", the default:
a mole, brows, nose width, mirrored hair part, all sub-pixel at 64 px but the
part; "marked": a cheek mark, thicker brows, wider-set eyes, 1-2 px at 64 px,
none a mirror image; docs/results.md). Gender changes the geometry (jaw width/shape, brows, nose, hair length)
so it is learnable from the pixels.

``ensure_synthetic(root, spec)`` writes ``root/synthetic-<hash>/`` once
(built in a temporary directory, then renamed). ``render_sample(spec, i, k)``
draws one sample to NumPy arrays for tests. ``python -m shards.synthetic
--out DIR --preview preview.png`` builds the dataset and/or a picture grid.

Modules, by what they draw or write: ``spec`` (options, label schemas, the
dataset hash), ``world`` (identities and twins), ``draw`` (pixel-grid
primitives), ``faces`` (pose, masks, depth/normals, albedo, visible image),
``thz`` (THz images of a face), ``ears``, ``many`` (the many-identities mode:
10^5 identities made from a few hundred drawn base faces by cheap transforms),
``render`` (one sample of either mode), ``dataset`` (splits, shards, manifest),
``preview`` (picture grid and the command). Names with a leading underscore are
private to this package.
"""
from .dataset import _file_lock, _sample_fields, build_synthetic, ensure_synthetic, sample_key, split_plan
from .ears import render_ear
from .faces import _sample_params, render_face
from .many import render_many
from .preview import main, preview_grid
from .render import render_sample
from .spec import GENERATOR_VERSION, LABEL_SCHEMAS, MODALITIES, SpecError, SyntheticSpec, spec_hash
from .world import _world

__all__ = ["GENERATOR_VERSION", "LABEL_SCHEMAS", "MODALITIES", "SpecError", "SyntheticSpec", "_file_lock",
           "_sample_fields", "_sample_params", "_world", "build_synthetic", "ensure_synthetic", "main", "preview_grid",
           "render_ear", "render_face", "render_many", "render_sample", "sample_key", "spec_hash", "split_plan"]
