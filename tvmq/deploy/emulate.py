"""python -m tvmq.deploy.emulate [--port 9190] [--tracker HOST:PORT --key rpi4]

An emulated Raspberry Pi on this machine: tvmq's aarch64 TVM runtime and RPC server
(cross-built once from the apache-tvm wheel's sources, then cached) under qemu-aarch64, on
127.0.0.1. Deploy to it with ``python -m tvmq.deploy ARTIFACT --rpc 127.0.0.1:9190``. Its
timings are emulated: they prove the path works, they are not Pi timings."""
from __future__ import annotations

import argparse
import signal
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from deploy.boards import EMULATED_CPUS, LOCALHOST, BoardStartError, emulated_pi
from deploy.runtime_build import build_board_runtime
from tvmq.default_model import cache_dir
from tvmq.errors import USER_ERRORS


def board_runtime(quiet: bool = False):
    """The directory with the board's runtime and server, cross-built once (rich progress)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), disable=quiet,
                  transient=True) as bar:
        task = bar.add_task("cross-building the aarch64 TVM runtime", total=None)

        def progress(done, total, what):
            bar.update(task, completed=done, total=total,
                       description=f"cross-building the aarch64 TVM runtime: {what}")

        return build_board_runtime(cache_dir(), progress=progress)


def start(port: int = 9190, host: str = LOCALHOST, tracker: str | None = None,
          key: str = "rpi4", target: str = "arm", quiet: bool = False,
          server_args: list[str] | tuple[str, ...] = ()):
    """Build (or reuse) the board runtime and start the emulated Pi; returns its process."""
    if target not in EMULATED_CPUS:
        raise BoardStartError(f"no emulated board for target {target!r} (the emulated"
                              f" boards: {', '.join(sorted(EMULATED_CPUS))})")
    board_runtime(quiet)
    return emulated_pi(cache_dir(), port=port, host=host, tracker=tracker, key=key,
                       target=target, server_args=server_args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tvmq.deploy.emulate",
                                 description=__doc__.split("\n\n")[1])
    ap.add_argument("--port", type=int, default=9190, help="0: any free port")
    ap.add_argument("--host", default=LOCALHOST,
                    help="address to bind (default 127.0.0.1; TVM RPC has no authentication)")
    ap.add_argument("--tracker", metavar="HOST:PORT", help="register with this tracker")
    ap.add_argument("--key", default="rpi4", help="tracker key (default rpi4)")
    ap.add_argument("--target", default="arm", choices=sorted(EMULATED_CPUS),
                    help="arm: Pi 4 (Cortex-A72); rpi5: Pi 5 (Cortex-A76, dotprod)")
    ap.add_argument("--session-timeout", type=int, default=None, metavar="S",
                    help="the board ends a session after S seconds (default 900; 0: never)")
    ap.add_argument("--max-sessions", type=int, default=None, metavar="N",
                    help="sessions at once (default 1: honest timings); others queue")
    ap.add_argument("--max-upload-mb", type=int, default=None, metavar="MB",
                    help="largest upload / RPC message the board accepts (default 256)")
    args = ap.parse_args(argv)
    server_args = [a for flag, v in (("--session-timeout", args.session_timeout),
                                     ("--max-sessions", args.max_sessions),
                                     ("--max-upload-mb", args.max_upload_mb)) if v is not None
                   for a in (flag, str(v))]
    err = Console(stderr=True)
    try:
        t0 = time.perf_counter()
        board = start(args.port, args.host, args.tracker, args.key, args.target,
                      server_args=server_args)
    except USER_ERRORS as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    where = (f"registered with tracker {args.tracker} as key {args.key!r}" if args.tracker
             else f"deploy with: python -m tvmq.deploy ARTIFACT --rpc {board.address}")
    err.print(f"[green]{board.name}[/] on {board.address} (ready in "
              f"{time.perf_counter() - t0:.1f} s); {where}. Ctrl-C stops it.", highlight=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while board.alive():
            time.sleep(0.5)
        err.print(f"[red]the emulated board exited[/]:\n{board.log()[-2000:]}", highlight=False)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        board.stop()


if __name__ == "__main__":
    sys.exit(main())
