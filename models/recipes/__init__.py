"""Built-in recipes; importing a module registers its recipe (``@register``)."""
from models.recipes import facecom  # noqa: F401
from models.recipes import dcal  # noqa: F401
