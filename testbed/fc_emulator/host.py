"""Many emulated VMs in one trio task tree, laid out as the jailer lays them out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from testbed.fc_emulator.vm import EmulatedVm, VmSpec


def jail_paths(root: Path, vm_id: str, *, transport: str = "fifo") -> tuple[Path, Path]:
    """``<root>/firecracker/<id>/root/run/firecracker.socket`` and the metrics path beside it."""
    chroot = root / "firecracker" / vm_id / "root"
    name = "metrics.fifo" if transport == "fifo" else "metrics.ndjson"
    return chroot / "run" / "firecracker.socket", chroot / name


class FcEmulator:
    """Emulated VMs that live as long as the nursery they were started in."""

    def __init__(self, nursery: trio.Nursery, root: Path) -> None:
        self.nursery = nursery
        self.root = root
        self.vms: dict[str, EmulatedVm] = {}

    def spec(self, vm_id: str, **options: Any) -> VmSpec:
        """A spec with jailer-style paths under ``root``; ``options`` override fields."""
        transport = options.get("transport", "fifo")
        api_socket, metrics_path = jail_paths(self.root, vm_id, transport=transport)
        return replace(VmSpec(vm_id, api_socket, metrics_path), **options)

    async def add(self, spec: VmSpec) -> EmulatedVm:
        vm = EmulatedVm(spec)
        self.vms[spec.vm_id] = vm
        await vm.start(self.nursery)
        return vm

    async def restart(self, vm: EmulatedVm, **options: Any) -> None:
        await vm.restart(self.nursery, **options)

    async def stop_all(self, *, clean: bool = True) -> None:
        for vm in self.vms.values():
            await vm.stop(clean=clean)

    def remove_files(self) -> None:
        """The sockets and metrics paths this emulator made (the directories stay)."""
        for vm in self.vms.values():
            vm.spec.api_socket.unlink(missing_ok=True)
            if vm.spec.metrics_path is not None:
                vm.spec.metrics_path.unlink(missing_ok=True)


@asynccontextmanager
async def open_emulator(root: Path) -> AsyncIterator[FcEmulator]:
    """An emulator whose VMs stop (cleanly) and whose files go when the block ends."""
    async with trio.open_nursery() as nursery:
        emulator = FcEmulator(nursery, root)
        try:
            yield emulator
        finally:
            with trio.CancelScope(shield=True):
                await emulator.stop_all(clean=True)
            nursery.cancel_scope.cancel()
            emulator.remove_files()
