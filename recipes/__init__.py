"""Recipes: one module per training recipe (data transform, model assembly from
``models/`` parts, losses, metrics, artefacts) on the contract in
:mod:`recipes.base`; shared helpers in ``batch``, ``image_input``,
``verification`` and ``verification_plots``."""
