"""PyInstaller runtime hook: give the agent's tasks the environment it was started with.

The one-file bootloader (and staticx around it) run the agent with
LD_LIBRARY_PATH pointing at their unpacked libraries and with _PYI_* and
STATICX_* variables. Children inherit os.environ, so a shell task would load
the agent's private libssl instead of the system's, and a task that starts
another PyInstaller program would take it for a child of its own. The dynamic
loader of this process read LD_LIBRARY_PATH when it started, so changing
os.environ here changes nothing for the agent itself.
"""

import os


def _restore() -> None:
    original = os.environ.pop("LD_LIBRARY_PATH_ORIG", None)
    if original is not None:
        os.environ["LD_LIBRARY_PATH"] = original
    else:
        os.environ.pop("LD_LIBRARY_PATH", None)
    for name in list(os.environ):
        if name.startswith(("_PYI_", "STATICX_")):
            del os.environ[name]


_restore()
