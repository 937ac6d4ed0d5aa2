"""``python -m alignednorm.cli``: the same as the ``alignednorm`` console script."""

from alignednorm.cli.commands import main

main()
