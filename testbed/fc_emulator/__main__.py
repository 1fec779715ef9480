"""``python -m testbed.fc_emulator --root DIR --vms N``: emulated VMs until SIGTERM/SIGINT.

Prints one JSON line when every VM is up (``{"ready": true, "vms": N, ...}``);
on SIGTERM/SIGINT every VM exits cleanly (its exit line) and the sockets
and FIFOs it made are removed.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import signal
import sys
from pathlib import Path

import trio

from testbed.fc_emulator.host import open_emulator

#: flushes each VM of this process keeps on record (nothing here reads older ones)
FLUSH_RECORD = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m testbed.fc_emulator")
    parser.add_argument("--root", type=Path, required=True, help="the jail root")
    parser.add_argument("--vms", type=int, default=1)
    parser.add_argument("--prefix", default="vm-", help="VM ids are <prefix><index>")
    parser.add_argument("--first", type=int, default=0, help="the first VM's index")
    parser.add_argument("--interval", type=float, default=60.0, help="periodic flush, s")
    parser.add_argument("--transport", choices=("fifo", "file"), default="fifo")
    parser.add_argument("--activity", action="store_true", help="synthetic guest activity")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    async with open_emulator(args.root) as emulator:
        for index in range(args.first, args.first + args.vms):
            vm_id = f"{args.prefix}{index}"
            spec = emulator.spec(
                vm_id,
                transport=args.transport,
                flush_interval=args.interval,
                activity=args.activity,
                seed=index,
                flush_record=FLUSH_RECORD,
            )
            await emulator.add(spec)
        # The VMs' state (a few hundred thousand objects) lives as long as the
        # process: out of the collector's walks, as a VMM written in Rust has none
        gc.freeze()
        ready = {"ready": True, "vms": args.vms, "root": str(args.root), "prefix": args.prefix}
        print(json.dumps(ready), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break


def raise_file_limit() -> None:
    """Each VM holds a listening socket, a metrics fd and its clients' connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    raise_file_limit()
    trio.run(run, parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
