"""``python -m diffgen.cli``: the same as the ``diffgen`` command."""
from diffgen.cli import main

main()
