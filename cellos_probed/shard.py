"""A share of the host's cells, for running the daemon as several processes.

One process runs every probe of every cell on one core's worth of Python:
at about a thousand cells the tick's work is more than that core can do in
half a tick. ``run --shard I/K`` runs shard ``I`` of ``K``: the cells whose
id hashes (CRC-32) to ``I`` modulo ``K``, so the same cell always lands in
the same shard, across restarts and reloads, and the K processes (one
systemd unit instance each: ``cellos-probed@I-K.service``) together cover
every cell exactly once. Each process is a whole daemon for its cells: its
own NATS connection, boot id, sequences and outbox; a spool gets a
directory per shard so that no two processes share segments, and
``[metrics]`` a textfile and a port per shard.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, replace
from typing import Final

from cellos_probed.config import Config, ConfigError, ListenAddress

_SHAPE: Final = re.compile(r"([0-9]+)/([0-9]+)")
MAX_SHARDS: Final = 64


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``I/K`` with ``0 <= I < K <= MAX_SHARDS``; ValueError saying what is wrong."""
        match = _SHAPE.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"--shard must be I/K (for example 0/2), got {text!r}")
        index, count = int(match[1]), int(match[2])
        if not 1 <= count <= MAX_SHARDS:
            raise ValueError(f"--shard: K must be between 1 and {MAX_SHARDS}, got {count}")
        if index >= count:
            raise ValueError(f"--shard: I must be less than K ({count}), got {index}")
        return cls(index, count)

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, cell_id: str) -> bool:
        return zlib.crc32(cell_id.encode()) % self.count == self.index

    def select(self, config: Config) -> Config:
        """``config`` with only this shard's cells (and its own spool directory,
        metrics textfile and metrics port: the shard's index added to the port)."""
        spool, metrics = config.spool, config.metrics
        if self.count > 1:
            suffix = f"shard-{self.index}-of-{self.count}"
            if spool is not None:
                spool = replace(spool, path=spool.path / suffix)
            if metrics.textfile is not None:
                textfile = metrics.textfile.with_suffix(f".{suffix}.prom")
                metrics = replace(metrics, textfile=textfile)
            if metrics.listen is not None:
                metrics = replace(metrics, listen=self._listen(metrics.listen, config.source))
        cells = tuple(cell for cell in config.cells if self.owns(cell.id))
        return replace(config, cells=cells, spool=spool, metrics=metrics)

    def _listen(self, listen: ListenAddress, source: str) -> ListenAddress:
        port = listen.port + self.index
        if port > 65535:
            raise ConfigError(
                f"shard {self.label} listens on port {listen.port} + {self.index}, past 65535: "
                "choose a lower port",
                file=source,
                key="metrics.listen",
            )
        return ListenAddress(listen.host, port)
