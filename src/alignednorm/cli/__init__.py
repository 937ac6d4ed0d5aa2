"""The ``alignednorm`` command line: the face floor's words over library calls.

:mod:`.options` declares the options every command shares, :mod:`.commands` the commands,
:mod:`.runs` ``run <protocol>`` and ``report``. Heavy modules are imported inside command bodies,
so ``--help``, ``--version`` and usage errors stay instant.
"""

from alignednorm.cli.commands import app, main

__all__ = ["app", "main"]
