"""Builders of real kernel objects (and the Firecracker emulator) for tests, demo and bench.

Everything here creates things on the host (network namespaces, TAP
devices, nftables tables, cgroups, emulated VMs) and always removes them.
"""
