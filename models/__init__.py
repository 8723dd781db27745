"""Pure ``torch.nn`` model pieces: backbones, heads, losses, augmentations and
the networks of each recipe (``models.dcal`` is Dual Cross-Attention Learning).
Nothing here imports ``recipes``, ``dist_train``, ``shards`` or ``launch``."""
