"""Firecracker's metrics line: sections, fields, key order, gauges.

Transcribed from the facts in ``../shared/reference/firecracker-metrics.md``
(sections 3, 4 and 10): ``FirecrackerMetrics`` in
``src/vmm/src/logger/metrics.rs`` and the per-device metrics of
``src/vmm/src/devices/virtio/*/metrics.rs``. Declaration order is output
order. A field whose name ends in ``_agg`` is a latency aggregate,
serialised as ``{"min_us", "max_us", "sum_us"}``.
"""

from __future__ import annotations

from typing import Final

#: The newest Firecracker release; the emulator's default ``vmm_version``.
RELEASE_VERSION: Final = "1.16.1"
#: The version string of main at the reference's commit.
MAIN_VERSION: Final = "1.17.0-dev"

AGG_FIELDS: Final = ("min_us", "max_us", "sum_us")


def _pairs(prefixes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{prefix}_{suffix}" for prefix in prefixes for suffix in ("count", "fails"))


API_SERVER: Final = ("process_startup_time_us", "process_startup_time_cpu_us")
BALLOON: Final = (
    "activate_fails",
    "inflate_count",
    "stats_updates_count",
    "stats_update_fails",
    "deflate_count",
    "event_fails",
    "free_page_report_count",
    "free_page_report_freed",
    "free_page_report_fails",
    "free_page_hint_count",
    "free_page_hint_freed",
    "free_page_hint_fails",
)
BLOCK: Final = (
    "activate_fails",
    "cfg_fails",
    "no_avail_buffer",
    "event_fails",
    "execute_fails",
    "invalid_reqs_count",
    "flush_count",
    "queue_event_count",
    "rate_limiter_event_count",
    "update_count",
    "update_fails",
    "read_bytes",
    "write_bytes",
    "read_count",
    "write_count",
    "read_agg",
    "write_agg",
    "rate_limiter_throttled_events",
    "io_engine_throttled_events",
    "remaining_reqs_count",
)
DEPRECATED_API: Final = ("deprecated_http_api_calls",)
GET_API_REQUESTS: Final = (
    "instance_info_count",
    "machine_cfg_count",
    "mmds_count",
    "vmm_version_count",
    "hotplug_memory_count",
)
I8042: Final = (
    "error_count",
    "missed_read_count",
    "missed_write_count",
    "read_count",
    "reset_count",
    "write_count",
)
UART: Final = (
    "error_count",
    "flush_count",
    "missed_read_count",
    "missed_write_count",
    "read_count",
    "write_count",
    "rate_limiter_dropped_bytes",
)
_LATENCY_NAMES: Final = (
    "full_create_snapshot",
    "diff_create_snapshot",
    "load_snapshot",
    "pause_vm",
    "resume_vm",
)
LATENCIES_US: Final = _LATENCY_NAMES + tuple(f"vmm_{name}" for name in _LATENCY_NAMES)
LOGGER: Final = (
    "missed_metrics_count",
    "metrics_fails",
    "missed_log_count",
    "rate_limited_log_count",
)
MMDS: Final = (
    "rx_accepted",
    "rx_accepted_err",
    "rx_accepted_unusual",
    "rx_bad_eth",
    "rx_invalid_token",
    "rx_no_token",
    "rx_count",
    "tx_bytes",
    "tx_count",
    "tx_errors",
    "tx_frames",
    "connections_created",
    "connections_destroyed",
)
NET_MAIN: Final = (
    "activate_fails",
    "cfg_fails",
    "no_rx_avail_buffer",
    "no_tx_avail_buffer",
    "event_fails",
    "rx_queue_event_count",
    "rx_event_rate_limiter_count",
    "rx_rate_limiter_throttled",
    "rx_tap_event_count",
    "rx_bytes_count",
    "rx_packets_count",
    "rx_fails",
    "rx_count",
    "tap_read_fails",
    "tap_write_fails",
    "tap_write_agg",
    "tx_bytes_count",
    "tx_malformed_frames",
    "tx_fails",
    "tx_count",
    "tx_packets_count",
    "tx_queue_event_count",
    "tx_rate_limiter_event_count",
    "tx_rate_limiter_throttled",
    "tx_spoofed_mac_count",
    "tx_remaining_reqs_count",
)
#: v1.16.1 has one more net field, removed on main by d91a74c1b (reference section 10).
NET_RELEASE: Final = (*NET_MAIN[:2], "mac_address_updates", *NET_MAIN[2:])
PATCH_API_REQUESTS: Final = _pairs(
    ("drive", "network", "machine_cfg", "mmds", "hotplug_memory", "pmem")
)
PUT_API_REQUESTS: Final = _pairs(
    (
        "actions",
        "boot_source",
        "drive",
        "logger",
        "machine_cfg",
        "cpu_cfg",
        "metrics",
        "network",
        "mmds",
        "vsock",
        "pmem",
        "serial",
        "hotplug_memory",
    )
)
SECCOMP: Final = ("num_faults",)
VCPU: Final = (
    "exit_io_in",
    "exit_io_out",
    "exit_mmio_read",
    "exit_mmio_write",
    "failures",
    "kvmclock_ctrl_fails",
    "exit_io_in_agg",
    "exit_io_out_agg",
    "exit_mmio_read_agg",
    "exit_mmio_write_agg",
)
VMM: Final = ("panic_count",)
SIGNALS: Final = ("sigbus", "sigsegv", "sigxfsz", "sigxcpu", "sigpipe", "sighup", "sigill")
VSOCK: Final = (
    "activate_fails",
    "cfg_fails",
    "rx_queue_event_fails",
    "tx_queue_event_fails",
    "ev_queue_event_fails",
    "muxer_event_fails",
    "conn_event_fails",
    "rx_queue_event_count",
    "tx_queue_event_count",
    "rx_bytes_count",
    "tx_bytes_count",
    "rx_packets_count",
    "tx_packets_count",
    "conns_added",
    "conns_killed",
    "conns_removed",
    "killq_resync",
    "tx_flush_fails",
    "tx_write_fails",
    "rx_read_fails",
)
ENTROPY: Final = (
    "activate_fails",
    "entropy_event_fails",
    "entropy_event_count",
    "entropy_bytes",
    "host_rng_fails",
    "entropy_rate_limiter_throttled",
    "rate_limiter_event_count",
)
PMEM: Final = (
    "activate_fails",
    "cfg_fails",
    "event_fails",
    "queue_event_count",
    "rate_limiter_throttled_events",
    "rate_limiter_event_count",
)
VHOST_USER: Final = (
    "activate_fails",
    "cfg_fails",
    "init_time_us",
    "activate_time_us",
    "config_change_time_us",
)
INTERRUPTS: Final = ("triggers", "config_updates")
MEMORY_HOTPLUG: Final = (
    "activate_fails",
    "queue_event_fails",
    "queue_event_count",
    "plug_agg",
    "plug_count",
    "plug_bytes",
    "plug_fails",
    "unplug_agg",
    "unplug_count",
    "unplug_bytes",
    "unplug_fails",
    "unplug_discard_fails",
    "unplug_all_agg",
    "unplug_all_count",
    "unplug_all_fails",
    "state_agg",
    "state_count",
    "state_fails",
)

#: ``SharedStoreMetric`` fields (current values, never reset), by section kind.
#: Every ``*_agg`` ``min_us``/``max_us`` is a gauge too (see :func:`is_gauge`).
GAUGES: Final[dict[str, frozenset[str]]] = {
    "api_server": frozenset(API_SERVER),
    "latencies_us": frozenset(LATENCIES_US),
    "seccomp": frozenset(SECCOMP),
    "vmm": frozenset(VMM),
    "signals": frozenset(SIGNALS) - {"sigpipe"},
    "vhost_user": frozenset({"init_time_us", "activate_time_us", "config_change_time_us"}),
}


def is_gauge(kind: str, field: str, sub: str | None = None) -> bool:
    """Whether a leaf is a gauge; ``kind`` is the section name or device kind."""
    if sub is not None:
        return sub != "sum_us"
    return field in GAUGES.get(kind, frozenset())


def net_fields(version: str) -> tuple[str, ...]:
    return NET_RELEASE if version.startswith("1.16.") else NET_MAIN


def has_id_and_properties(version: str) -> bool:
    """``MetricsConfig.emit_id``/``properties`` (``src/vmm/src/vmm_config/metrics.rs``):
    on main only; a release up to 1.16.1 ignores them as unknown keys."""
    return not version.startswith("1.16.")


def fixed_sections(version: str) -> dict[str, tuple[str, ...]]:
    """Every section that is always present, by name (order irrelevant here)."""
    return {
        "api_server": API_SERVER,
        "balloon": BALLOON,
        "block": BLOCK,
        "deprecated_api": DEPRECATED_API,
        "get_api_requests": GET_API_REQUESTS,
        "i8042": I8042,
        "uart": UART,
        "latencies_us": LATENCIES_US,
        "logger": LOGGER,
        "mmds": MMDS,
        "net": net_fields(version),
        "patch_api_requests": PATCH_API_REQUESTS,
        "put_api_requests": PUT_API_REQUESTS,
        "seccomp": SECCOMP,
        "vcpu": VCPU,
        "vmm": VMM,
        "signals": SIGNALS,
        "vsock": VSOCK,
        "entropy": ENTROPY,
        "pmem": PMEM,
        "interrupts": INTERRUPTS,
        "memory_hotplug": MEMORY_HOTPLUG,
    }


def section_order(
    *,
    nets: tuple[str, ...] = (),
    blocks: tuple[str, ...] = (),
    pmems: tuple[str, ...] = (),
    vhost_user_blocks: tuple[str, ...] = (),
) -> list[tuple[str, str]]:
    """(key, kind) of every section after ``utc_timestamp_ms``, in serialisation order.

    Per-device entries live in a ``BTreeMap``: sorted by id, each group
    followed by its aggregate. ``rtc`` is aarch64-only and not emitted here
    (the emulator is an x86_64 host).
    """

    def devices(prefix: str, ids: tuple[str, ...], kind: str) -> list[tuple[str, str]]:
        return [(f"{prefix}{device}", kind) for device in sorted(ids)]

    order: list[tuple[str, str]] = [("api_server", "api_server"), ("balloon", "balloon")]
    order += devices("block_", blocks, "block")
    order += [
        ("block", "block"),
        ("deprecated_api", "deprecated_api"),
        ("get_api_requests", "get_api_requests"),
        ("i8042", "i8042"),
        ("uart", "uart"),
        ("latencies_us", "latencies_us"),
        ("logger", "logger"),
        ("mmds", "mmds"),
    ]
    order += devices("net_", nets, "net")
    order += [
        ("net", "net"),
        ("patch_api_requests", "patch_api_requests"),
        ("put_api_requests", "put_api_requests"),
        ("seccomp", "seccomp"),
        ("vcpu", "vcpu"),
        ("vmm", "vmm"),
        ("signals", "signals"),
        ("vsock", "vsock"),
        ("entropy", "entropy"),
    ]
    order += devices("pmem_", pmems, "pmem")
    order.append(("pmem", "pmem"))
    order += devices("vhost_user_block_", vhost_user_blocks, "vhost_user")
    order += [("interrupts", "interrupts"), ("memory_hotplug", "memory_hotplug")]
    return order


#: Aggregate section name for each per-device kind that has one.
AGGREGATES: Final = {"net": "net", "block": "block", "pmem": "pmem"}


def kind_of_key(key: str) -> str:
    """The section kind of a line key: ``net_eth0`` -> ``net``, ``vcpu`` -> ``vcpu``."""
    for prefix, kind in (
        ("vhost_user_block_", "vhost_user"),
        ("net_", "net"),
        ("block_", "block"),
        ("pmem_", "pmem"),
    ):
        if key.startswith(prefix):
            return kind
    return key
