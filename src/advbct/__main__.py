"""``python -m advbct`` (what torchrun launches) runs the console script."""

from advbct.cli import main

main()
