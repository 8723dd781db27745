"""``python -m shards.synthetic``."""
import sys

from .preview import main

sys.exit(main())
