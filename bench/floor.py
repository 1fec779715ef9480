"""The floor: the same kernel reads as the daemon, by the simplest loop that could do them.

No parsing beyond finding a message's end, no events, no NATS: per tick it
opens and reads each cell's cgroup files, does one raw rtnetlink link dump
per namespace, one libnftables listing of the table, and one FlushMetrics
request plus the line it causes per VM. Its CPU per tick is what any
implementation must spend; the daemon's CPU is reported as a ratio to it.
Beside it, not in its total: the cgroup reads through descriptors kept open
(one pread a file, as the daemon does on cgroup2), so the daemon can also be
compared with a floor that does that.

Usage: python bench/floor.py SPEC.json  (prints one JSON object)
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

CGROUP_FILES = (
    "memory.events", "cpu.stat", "pids.events", "memory.current", "memory.peak",
    "pids.current", "cpu.pressure", "memory.pressure", "io.pressure",
)  # fmt: skip
CLONE_NEWNET = 0x40000000
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTM_GETLINK, NLMSG_DONE = 18, 3
libc = ctypes.CDLL(None, use_errno=True)


def read_cgroups(dirs: list[str]) -> int:
    total = 0
    for directory in dirs:
        for name in CGROUP_FILES:
            try:
                fd = os.open(f"{directory}/{name}", os.O_RDONLY)
            except FileNotFoundError:
                continue
            total += len(os.read(fd, 65536))
            os.close(fd)
    return total


def open_cgroup_files(dirs: list[str]) -> list[int]:
    """Every existing cgroup file, opened once (the kept-descriptor variant)."""
    fds = []
    for directory in dirs:
        for name in CGROUP_FILES:
            try:
                fds.append(os.open(f"{directory}/{name}", os.O_RDONLY))
            except FileNotFoundError:
                continue
    return fds


def pread_cgroups(fds: list[int]) -> int:
    return sum(len(os.pread(fd, 65536, 0)) for fd in fds)


def netlink_dump(sock: socket.socket) -> int:
    header = struct.pack("=LHHLL", 32, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    sock.send(header + struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0))
    total = 0
    while True:
        data = sock.recv(1 << 20)
        total += len(data)
        offset = 0
        while offset < len(data):
            length, kind = struct.unpack_from("=LH", data, offset)
            if kind == NLMSG_DONE:
                return total
            offset += (length + 3) & ~3


def flush_vm(api_socket: str, fifo_fd: int, pending: bytearray) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(api_socket)
        body = b'{"action_type":"FlushMetrics"}'
        conn.sendall(
            b"PUT /actions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        conn.recv(4096)
    while b"\n" not in pending:
        try:
            pending += os.read(fifo_fd, 1 << 16)
        except BlockingIOError:
            time.sleep(0.0005)
    del pending[: pending.rindex(b"\n") + 1]


def main() -> None:
    spec: dict[str, Any] = json.loads(Path(sys.argv[1]).read_text())
    host_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    cell_ns = os.open(spec["netns"], os.O_RDONLY) if spec.get("netns") else None
    nft = None
    if spec.get("nft"):
        import nftables

        if cell_ns is not None:
            libc.setns(cell_ns, CLONE_NEWNET)
        nft = nftables.Nftables()
        nft.set_json_output(True)
        rtnl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        libc.setns(host_ns, CLONE_NEWNET)
    elif cell_ns is not None:
        libc.setns(cell_ns, CLONE_NEWNET)
        rtnl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        libc.setns(host_ns, CLONE_NEWNET)
    else:
        rtnl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    vms = [
        (vm["api_socket"], os.open(vm["metrics_path"], os.O_RDONLY | os.O_NONBLOCK), bytearray())
        for vm in spec.get("vms", [])
    ]
    ticks, tick = int(spec["ticks"]), float(spec["tick_seconds"])
    parts = {"cgroup": 0.0, "tap_link": 0.0, "nftables": 0.0, "fc_metrics": 0.0}
    # The same cgroup reads through descriptors kept open (as the daemon does on
    # cgroup2): measured beside the floor, for the reader, and left out of its total.
    kept_fds = open_cgroup_files(spec.get("cgroup_dirs", []))
    kept_cgroup = 0.0
    start_cpu = time.process_time()
    deadline = time.monotonic()
    for _ in range(ticks):
        t0 = time.process_time()
        read_cgroups(spec.get("cgroup_dirs", []))
        t1 = time.process_time()
        netlink_dump(rtnl)
        t2 = time.process_time()
        if nft is not None:
            if cell_ns is not None:
                libc.setns(cell_ns, CLONE_NEWNET)
            nft.cmd(f"list table {spec['nft']['family']} {spec['nft']['table']}")
            if cell_ns is not None:
                libc.setns(host_ns, CLONE_NEWNET)
        t3 = time.process_time()
        for api, fd, pending in vms:
            flush_vm(api, fd, pending)
        t4 = time.process_time()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[key] += value
        t5 = time.process_time()
        pread_cgroups(kept_fds)
        kept_cgroup += time.process_time() - t5
        deadline += tick
        time.sleep(max(0.0, deadline - time.monotonic()))
    total = time.process_time() - start_cpu - kept_cgroup
    print(json.dumps({
        "cpu_seconds_per_tick": total / ticks,
        "parts_cpu_seconds_per_tick": {k: v / ticks for k, v in parts.items()},
        "cgroup_kept_descriptors_cpu_seconds_per_tick": kept_cgroup / ticks,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
