"""python -m tvmq.deploy ARTIFACT_DIR (--rpc HOST:PORT | --tracker HOST:PORT --key KEY | --emulate)

Upload a built artifact to a board over TVM RPC, check its outputs bit for bit against the
PyTorch integer reference, and time it. Writes ARTIFACT_DIR/deploy.json and deploy.png."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console

from deploy.report import table

from tvmq.artifact import Artifact
from tvmq.deploy import emulate, run
from tvmq.errors import USER_ERRORS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tvmq.deploy", description=__doc__.split("\n\n")[1])
    ap.add_argument("artifact", help="directory written by python -m tvmq.build")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--rpc", metavar="HOST:PORT", help="a TVM RPC server (one board)")
    where.add_argument("--tracker", metavar="HOST:PORT", help="a TVM RPC tracker (board pool)")
    where.add_argument("--emulate", action="store_true",
                       help="start the emulated Raspberry Pi (qemu) for this run, then stop it")
    ap.add_argument("--key", default="rpi4", help="tracker key of the boards (default rpi4)")
    ap.add_argument("--boards", type=int, default=1,
                    help="with --tracker: how many free boards to run on (0: all)")
    ap.add_argument("--repeat", type=int, default=10, help="timed repeats (default 10)")
    ap.add_argument("--number", type=int, default=0,
                    help="runs per repeat (default 0: enough to fill --min-repeat-ms)")
    ap.add_argument("--min-repeat-ms", type=float, default=200)
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    ap.add_argument("--inputs", type=int, help="check only the first N parity inputs")
    ap.add_argument("--threads", type=int, help="TVM worker threads on the board (default:"
                    " TVM_NUM_THREADS if set, else the target's core count: 4 on a Pi)")
    args = ap.parse_args(argv)
    out, err = Console(), Console(stderr=True)
    board = None
    try:
        rpc = args.rpc
        if args.emulate:
            board = emulate.start(target=Artifact.open(args.artifact).manifest["target"]["name"],
                                  port=0)
            rpc = board.address
        with err.status("deploying") as status:
            report = run(args.artifact, rpc=rpc, tracker=args.tracker, key=args.key,
                         boards=args.boards, repeat=args.repeat, number=args.number,
                         min_repeat_ms=args.min_repeat_ms, warmup=args.warmup,
                         inputs=args.inputs, progress=status.update, threads=args.threads)
    except USER_ERRORS as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    finally:
        if board is not None:
            board.stop()
    out.print(table(report))
    ran = ", ".join(f"{b['board']}: {b['threads'] if b['threads'] is not None else 'unknown'}"
                    for b in report["boards"])
    out.print(f"TVM threads (asked {report['threads']}): {ran}")
    out.print(f"report: {args.artifact}/deploy.json, {args.artifact}/deploy.png")
    return 0 if all(b["parity"]["mismatches"] == 0 for b in report["boards"]) else 1


if __name__ == "__main__":
    sys.exit(main())
