"""Which :class:`~pdepth.depth.support.Support` a call uses: ``shard=``, the older
``shard_offset=`` / ``process_group=`` keywords, or the local default. Above both
implementations, so that neither imports the other."""

from __future__ import annotations

from .sharded import ShardedSupport
from .support import LocalSupport, Support

__all__ = ["resolve_support"]


def resolve_support(shard=None, shard_offset=None, process_group=None) -> Support:
    """The :class:`Support` of a call: ``shard=`` (a :class:`LocalSupport` or a
    :class:`pdepth.ShardedSupport`), or the older ``shard_offset=`` /
    ``process_group=`` keywords (deprecated aliases for
    ``shard=ShardedSupport(shard_offset, process_group)``), or local."""
    if shard is not None:
        if shard_offset is not None or process_group is not None:
            raise ValueError("give shard= or shard_offset= / process_group= (its older "
                             "spelling), not both")
        if not isinstance(shard, Support):
            raise ValueError("shard= must be a pdepth.ShardedSupport or a "
                             f"LocalSupport, got {type(shard).__name__}")
        return shard
    if shard_offset is None and process_group is None:
        return LocalSupport()
    if shard_offset is None:
        raise ValueError("process_group= needs shard_offset=, the global index of this "
                         "rank's first support row")
    return ShardedSupport(shard_offset, process_group)
