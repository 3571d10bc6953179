"""Imported last by :class:`p2pfed.launcher.NodeLauncher`'s fork server: freeze the GC.

Importing this module has a side effect on purpose (the fork server's preload can only
import modules): see :func:`p2pfed.launcher.freeze_imports`. Nothing else imports it.
"""

from p2pfed.launcher import freeze_imports

freeze_imports()
