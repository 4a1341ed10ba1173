"""``python -m aglcl train ...`` (also what ``accelerate launch -m aglcl`` runs)."""

from aglcl.cli import main

main()
