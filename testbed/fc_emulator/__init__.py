"""A Firecracker emulator: API socket and metrics stream of many VMs in one process.

Firecracker cannot boot here; this test double follows its source as
recorded in ``../shared/reference/firecracker-metrics.md``. In-process
(trio)::

    async with open_emulator(root) as emulator:
        vm = await emulator.add(emulator.spec("cell-1", flush_interval=0.5))

or as a process: ``python -m testbed.fc_emulator --root DIR --vms N``.
"""

from testbed.fc_emulator.host import FcEmulator, jail_paths, open_emulator
from testbed.fc_emulator.process import emulator_process
from testbed.fc_emulator.vm import EmulatedVm, VmSpec

__all__ = [
    "EmulatedVm", "FcEmulator", "VmSpec", "emulator_process", "jail_paths", "open_emulator",
]  # fmt: skip
