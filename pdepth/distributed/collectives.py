"""The collectives under :mod:`pdepth.distributed`: the group, the all-gather with a clear
error, the same failure raised on every rank (:func:`check_all`), equal settings across ranks
(:func:`check_same`) and exact checksums of a tensor's bits."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["check_all", "check_same"]

_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def _group_info(process_group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "pdepth.distributed needs an initialised process group: call "
            "torch.distributed.init_process_group(backend, timeout=datetime.timedelta(...)) "
            "first (torchrun sets the environment for init_method='env://')"
        )
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


def _comm_device(group, device: torch.device) -> torch.device:
    """Where the collectives' tensors live: the CPU for gloo, a CUDA device for NCCL."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _all_gather(t: torch.Tensor, group, world: int, op: str, what: str) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    try:
        dist.all_gather(out, t.contiguous(), group=group)
    except Exception as exc:
        raise RuntimeError(
            f"{op}: the all-gather of the {what} failed on rank {dist.get_rank(group)}: "
            "another rank died, hung, or did not make the same call (every rank of the "
            "group must call it; the wait is bounded by the timeout= given to "
            f"init_process_group). Cause: {type(exc).__name__}: {exc}"
        ) from exc
    return out


def _fail(op: str, failed: list[int], error: BaseException | None, group, world: int,
          gather: bool = True):
    """Raises the same RuntimeError on every rank, naming the failed ranks (and their errors,
    exchanged with all_gather_object where that works)."""
    mine = None if error is None else f"{type(error).__name__}: {error}"
    details: list = [None] * world
    try:
        dist.all_gather_object(details, mine, group=group)
    except Exception:  # pragma: no cover - best effort only
        details = [None] * world
    ranks = ", ".join(str(r) for r in failed)
    lines = [f"{op}: failed on rank(s) {ranks} of {world}"
             + ("; no rank entered the gather" if gather else "")]
    for r in failed:
        lines.append(f"  rank {r}: {details[r] or 'see the error raised on that rank'}")
    message = "\n".join(lines)
    if error is not None:
        raise RuntimeError(message) from error
    raise RuntimeError(message)


def check_same(values: dict, what: str, process_group=None) -> None:
    """Collective: raises the same :class:`ValueError` on every rank, naming the keys whose
    values differ and each rank's value, unless every rank passes equal ``values``
    (JSON-like: compared with ``==`` after an all-gather of the objects)."""
    group, _, world = _group_info(process_group)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, values, group=group)
    keys = sorted({k for v in gathered for k in v}, key=str)
    diff = [f"{k}: " + ", ".join(f"rank {r} {v.get(k)!r}" for r, v in enumerate(gathered))
            for k in keys if any(v.get(k) != gathered[0].get(k) for v in gathered)]
    if diff:
        raise ValueError(f"{what}: the ranks' settings differ ({'; '.join(diff)}); start every "
                         "rank with the same arguments")


def _checksum(t: torch.Tensor, chunk: int = 2**22) -> tuple[int, int]:
    """Exact, order-independent checksums of the bits of a float tensor ``[M, D]``: its row
    sums weighted by row number and its column sums weighted by column number (int64 sums
    wrap modulo 2**64, so neither rounding nor thread count can change them). Rows go in
    blocks of about ``chunk`` elements, so the int64 copy stays small."""
    bits = t.detach().view(_BITS[t.dtype])
    step = max(1, chunk // max(1, t.shape[1]))
    rows = torch.zeros(t.shape[0], dtype=torch.int64, device=t.device)
    cols = torch.zeros(t.shape[1], dtype=torch.int64, device=t.device)
    for i in range(0, t.shape[0], step):
        block = bits[i:i + step].to(torch.int64)
        rows[i:i + step] = block.sum(1)
        cols += block.sum(0)
    return _weighted(rows), _weighted(cols)


def _weighted(v: torch.Tensor) -> int:
    """``sum_i (i + 1) * v[i]`` in int64 (wrapping)."""
    return int((v.to(torch.int64) * torch.arange(1, v.numel() + 1, device=v.device)).sum())


def check_all(error: BaseException | None, what: str, process_group=None) -> None:
    """Collective: raises the same :class:`RuntimeError`, naming the failed ranks, on every
    rank when ``error`` is not None on any rank; returns on every rank otherwise.

    Wrap a rank-local step in ``try`` / ``except Exception as exc: error = exc`` and call this
    after it, so that one rank's failure does not leave the others waiting in the next
    collective until the process group's timeout."""
    group, _, world = _group_info(process_group)
    flag = torch.tensor([int(error is not None)], dtype=torch.int64,
                        device=_comm_device(group, torch.device("cpu")))
    flags = _all_gather(flag, group, world, what, "error flags")
    failed = [r for r in range(world) if int(flags[r][0])]
    if failed:
        _fail(what, failed, error, group, world, gather=False)
