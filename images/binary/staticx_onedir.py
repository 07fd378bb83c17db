"""Make PyInstaller's one-folder agent one static file with staticx.

    staticx_onedir.py FOLDER OUTPUT [--no-compress]

FOLDER is `pyinstaller --onedir --contents-directory .` output: the bootloader
`edgerun-agent` with libpython, the other shared libraries, lib-dynload and the
data files beside it. staticx packs the bootloader with the C libraries it
needs; this adds the whole folder to the same archive (and the C libraries the
folder's own ELF files need), so staticx's launcher unpacks everything once
and the bootloader runs Python in its own process. A one-file PyInstaller
program inside staticx would unpack a second time at every start, from a
second process that stays for the agent's lifetime (2 MiB of RSS).

The unpacked bootloader finds its folder beside itself, and the libraries
there through the run-time search path staticx gives it.
"""

from __future__ import annotations

import logging
import os
import sys

from staticx.api import StaticxGenerator  # type: ignore[import-untyped,import-not-found,unused-ignore]
from staticx.elf import get_shobj_deps, is_dynamic_elf  # type: ignore[import-untyped,import-not-found,unused-ignore]

PROGRAM = "edgerun-agent"


def build(folder: str, output: str, compress: bool) -> None:
    program = os.path.join(folder, PROGRAM)
    bundled = set(os.listdir(folder))
    # staticx adds the bootloader's own libraries (libz.so.1, say) itself
    own = {os.path.basename(dep) for dep in get_shobj_deps(program)}
    with StaticxGenerator(prog=program, strip=True, compress=compress) as gen:
        for name in sorted(bundled - own - {PROGRAM}):
            gen.sxar.add_file(os.path.join(folder, name), arcname=name)  # dirs recursively
        for here, _dirs, files in os.walk(folder):
            for name in sorted(files):
                path = os.path.join(here, name)
                if path == program or not is_dynamic_elf(path):
                    continue
                for dep in get_shobj_deps(path):
                    if os.path.basename(dep) not in bundled:
                        gen.add_library(dep, exist_ok=True)
        gen.generate(output=output)


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--no-compress"]
    if len(args) != 2 or not os.path.isfile(os.path.join(args[0], PROGRAM)):
        print(f"usage: staticx_onedir.py FOLDER OUTPUT [--no-compress] "
              f"(FOLDER holding {PROGRAM})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="staticx: %(message)s")
    build(args[0], args[1], compress="--no-compress" not in argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
