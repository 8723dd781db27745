"""Model pieces shared by the recipes: backbones, heads, losses, augmentations.

``models.recipes`` holds one module per recipe (importing it registers them);
``models.dcal`` is the Dual Cross-Attention Learning model.
"""
