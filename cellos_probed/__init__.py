"""cellos-probed: the host-side witness of Firecracker microVM cells."""

__version__ = "0.2.0"
