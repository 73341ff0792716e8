"""``python -m torch_modularity``: the command line."""
import sys

from .cli import main

sys.exit(main())
