"""python -m tvmq.deploy.runtime [--out DIR]

The files a Raspberry Pi needs to serve TVM RPC: libtvm_ffi.so, libtvm_runtime.so and
tvmq_rpc_server, cross-built for aarch64 (glibc >= 2.34: Raspberry Pi OS bookworm or newer)
from the installed apache-tvm wheel's sources, and cached. The emulated Pi runs the same
files. Copy DIR to the Pi and start ``DIR/tvmq_rpc_server`` there (README: "Deploy")."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from rich.console import Console

from deploy.runtime_build import FILES
from tvmq.deploy.emulate import board_runtime
from tvmq.errors import USER_ERRORS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tvmq.deploy.runtime",
                                 description=__doc__.split("\n\n")[1])
    ap.add_argument("--out", default="build/board-runtime",
                    help="copy the files here (default build/board-runtime)")
    args = ap.parse_args(argv)
    try:
        built = board_runtime()
    except USER_ERRORS as e:
        Console(stderr=True).print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy2(built / name, out / name)
    Console().print(f"board runtime for aarch64 in {out}/: {', '.join(FILES)}\n"
                    f"on the Pi: {out.name}/tvmq_rpc_server --host 127.0.0.1 --port 9090"
                    " [--tracker HOST:PORT --key rpi4]", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
