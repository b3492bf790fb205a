"""``r1zero launch``: command-group entry for r1zero.cli (the implementation is in r1zero.cluster.cli)."""

from r1zero.cluster.cli import register_launch as register

__all__ = ["register"]
