"""Prediction depth over an embedding store (docs/design.md section 12): every example goes
through the network once per pass, each probe's embeddings are kept as one ``[n, D]``
float32 array -- in RAM, or in a ``.npy`` file when they exceed the memory budget -- and the
k-NN runs one probe at a time over that store, in blocks that fit the budget.

Rows of a store are in *query order*: the support set first (rows ``0..N-1``), then the
other queries, so a probe's support set is its first N rows and nothing is stored twice.

- :class:`LayerStore`: the arrays (RAM or files), written once and read in row blocks.
- :func:`plan_passes`: which probes each forward pass records (as many as fit).
- :func:`extract_to_store`: one pass, the forward truncated after its last probe.
- :func:`layer_knn`: one probe's k-NN predictions over the store (the op's streaming merge,
  so a probe split into blocks gives the same bits as one call).

The file reads and writes are plain ``read``/``write`` calls, not memory maps: pages of a
mapped file count in the process's resident set, so a mapped 12 GB probe would break the
budget that the blocks keep.

Under ``metric="cosine"`` a store holds the rows as the op ranks them: each row is
L2-normalised (:func:`pdepth.normalize_rows`) as it is written, once, and every block read
is used as it is. Normalising row by row on write gives the same bits as normalising the
whole probe at once (the rule reads one row at a time), and a block read later is never
normalised twice or in another grouping: the stored file *is* the k-NN's input.

A file that a later process may read back (a resumed run) gets a *record*
(:func:`write_record`): ``<file>.json``, written after the file is whole, with its size, its
sha256 and its owner (which run, model and probe it belongs to, its shape). A reader trusts
the file only where :func:`check_record` finds it unchanged and owned as expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from .._atomic import file_sha256, naming, temp_path, write_json
from ..ops import check_metric, knn, knn_sym, metric_rows
from ..probes import ProbeRecorder, ProbeSpec, pinned
from ..topk import Neighbors, empty_topk
from .support import LayerVote, LocalSupport

__all__ = ["LayerStore", "block_bytes", "block_rows", "check_record", "extract_to_store",
           "layer_knn", "plan_passes", "record_path", "remove_with_record", "self_block_rows",
           "sub_spec",
           "write_record"]

_DTYPE = np.dtype("<f4")
# What the op holds per neighbour of a query besides the row: the running top-k passed in
# and returned (float32 distance + int64 index, 12 B each) and its heap entry (16 B).
_TOPK_BYTES = 40


def record_path(path: str | os.PathLike) -> Path:
    """Where the record of ``path`` (:func:`write_record`) lies: ``<path>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_record(path: str | os.PathLike, owner: dict, sha256: str | None = None) -> None:
    """Writes the record of the whole file ``path`` (atomically, after it): its size, its
    sha256 (read from the file unless given, e.g. hashed while it was written) and
    ``owner`` (JSON: what the file is, e.g. its run, model, probe and shape)."""
    path = Path(path)
    write_json(record_path(path), {"file": path.name, "bytes": path.stat().st_size,
                                   "sha256": sha256 or file_sha256(path), "owner": owner})


def check_record(path: str | os.PathLike, owner: dict) -> str | None:
    """None where ``path`` is what its record says, unchanged, and its record's owner is
    ``owner``; else what is wrong (for a message: "<path> <problem>")."""
    path = Path(path)
    try:
        record = json.loads(record_path(path).read_text())
        size, digest, said = record["bytes"], record["sha256"], record["owner"]
    except FileNotFoundError:
        return f"has no record ({record_path(path).name}: the run stopped before writing it)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"has a damaged record ({record_path(path).name}: {type(exc).__name__})"
    if said != json.loads(json.dumps(owner)):
        diff = sorted(k for k in set(said) | set(owner) if said.get(k) != owner.get(k)) \
            if isinstance(said, dict) else ["owner"]
        return f"belongs to something else ({', '.join(map(str, diff))} differ)"
    try:
        if path.stat().st_size != size:
            return f"has {path.stat().st_size} bytes, {size} when it was written"
        if file_sha256(path) != digest:
            return "was changed after it was written (its sha256 differs from its record's)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


def remove_with_record(path: str | os.PathLike) -> None:
    """Deletes ``path`` and its record (where they exist)."""
    Path(path).unlink(missing_ok=True)
    record_path(path).unlink(missing_ok=True)


class LayerStore:
    """The embeddings ``[n, D_l]`` (float32) of each probe ``l``: in RAM (``folder`` None) or
    one ``.npy`` file per probe, ``folder/{prefix}.emb{l:02d}.npy`` (written under a
    temporary name and renamed when complete, so a file with the final name is whole).

    With an ``owner`` (JSON, e.g. the run's key and the model), each file gets a record
    (:func:`write_record`: its sha256 hashed as it is written, the owner, the probe and its
    shape), and a file is taken as stored (:meth:`has`) only where its record checks
    (:func:`check_record`); one that fails is deleted, ``log`` told why, and extracted again.

    Args:
        n: rows (examples, in query order).
        dims: ``[L]`` width of each probe.
        folder: where the files go; None keeps the arrays in RAM.
        prefix: file name prefix (e.g. the model's name).
        owner: what the files belong to (None: no records, a file is trusted as it is).
        log: called with one line for each file found damaged or not this owner's.
        metric: ``"euclidean"`` (rows stored as given) or ``"cosine"`` (each row stored
            L2-normalised, :func:`pdepth.normalize_rows`; the records' owner says so, so a
            file of one metric is never read as the other).
    """

    def __init__(self, n: int, dims, folder: str | os.PathLike | None = None,
                 prefix: str = "store", owner: dict | None = None, log=None,
                 metric: str = "euclidean"):
        self.metric = check_metric(metric, "LayerStore")
        self.n, self.dims = int(n), [int(d) for d in dims]
        self.folder = None if folder is None else Path(folder)
        self.prefix = prefix
        self.owner, self.log = owner, log
        self._ram: dict[int, np.ndarray] = {}
        self._writing: dict[int, tuple] = {}
        self._checked: set[int] = set()  # files whose record was checked

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    def nbytes(self, layer: int) -> int:
        return self.n * self.dims[layer] * _DTYPE.itemsize

    def path(self, layer: int) -> Path:
        return self.folder / f"{self.prefix}.emb{layer:02d}.npy"

    def file_owner(self, layer: int) -> dict:
        """The owner in the record of probe ``layer``'s file."""
        owner = {**(self.owner or {}), "file": f"emb{layer:02d}",
                 "shape": [self.n, self.dims[layer]], "dtype": _DTYPE.str}
        if self.metric != "euclidean":  # the records of euclidean stores stay as they were
            owner["metric"] = self.metric
        return owner

    def has(self, layer: int) -> bool:
        """Whether probe ``layer`` is stored whole (and, with an owner, its file checks
        against its record: else it is deleted, to be extracted again)."""
        if not self.on_disk:
            return layer in self._ram
        path = self.path(layer)
        if layer in self._checked or not path.exists():
            return path.exists()
        if self.owner is not None:
            problem = check_record(path, self.file_owner(layer))
            if problem:
                if self.log:
                    self.log(f"  {path} {problem}: extracting it again")
                remove_with_record(path)
                return False
        self._checked.add(layer)
        return True

    def open(self, layer: int) -> None:
        """Starts writing probe ``layer`` (rows arrive in order through :meth:`write`). On
        disk the file's space is reserved first, so a full disk fails here, cleanly."""
        if not self.on_disk:
            self._writing[layer] = (np.empty((self.n, self.dims[layer]), _DTYPE), 0)
            return
        tmp = temp_path(self.path(layer))
        f = open(tmp, "wb")
        try:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {"descr": _DTYPE.str, "fortran_order": False,
                         "shape": (self.n, self.dims[layer])})
            f.write(header.getvalue())
            f.flush()
            os.posix_fallocate(f.fileno(), 0, f.tell() + self.nbytes(layer))
        except BaseException as exc:
            f.close()
            tmp.unlink(missing_ok=True)
            named = naming(exc, self.path(layer))  # "No space left" names no file
            if named is exc:
                raise
            raise named from exc
        # the record's checksum, hashed as the file is written (never read back for it)
        digest = hashlib.sha256(header.getvalue()) if self.owner is not None else None
        self._writing[layer] = (f, tmp, digest)

    def write(self, layer: int, rows: torch.Tensor) -> None:
        """Appends ``rows [B, D_l]`` to probe ``layer`` (normalised under ``"cosine"``)."""
        rows = metric_rows(self.metric, rows.detach().to(torch.float32), op="LayerStore")[0]
        a = np.ascontiguousarray(rows.cpu().numpy(), dtype=_DTYPE)
        target, pos, *digest = self._writing[layer]
        if self.on_disk:
            target.write(a.data)
            if digest[0] is not None:
                digest[0].update(a.data)
        else:
            target[pos:pos + a.shape[0]] = a
            self._writing[layer] = (target, pos + a.shape[0])

    def commit(self, layer: int) -> None:
        """Ends writing probe ``layer``: the file gets its final name (after ``fsync``)."""
        target, tmp, *digest = self._writing.pop(layer)
        if not self.on_disk:
            self._ram[layer] = target
            return
        written = target.tell()
        target.flush()
        os.fsync(target.fileno())
        target.close()
        header = written - self.nbytes(layer)
        if header <= 0 or header % 16:  # .npy headers are padded to a multiple of 16
            Path(tmp).unlink(missing_ok=True)
            raise RuntimeError(f"{self.path(layer)}: {written} bytes written, expected a "
                               f"header and {self.nbytes(layer)} bytes of embeddings")
        remove_with_record(self.path(layer))  # a stale record never describes the new file
        os.replace(tmp, self.path(layer))
        if digest[0] is not None:
            write_record(self.path(layer), self.file_owner(layer), digest[0].hexdigest())
        self._checked.add(layer)

    def abort(self) -> None:
        """Drops every probe being written (their temporary files too)."""
        for target, tmp, *_ in self._writing.values():
            if self.on_disk:
                target.close()
                Path(tmp).unlink(missing_ok=True)
        self._writing.clear()

    def rows(self, layer: int, start: int, stop: int, out: np.ndarray | None = None
             ) -> torch.Tensor:
        """Rows ``start:stop`` of probe ``layer`` as a float32 tensor: a view of the RAM
        array, or read from the file (into ``out`` when given, a buffer of at least that
        many rows, so that blocks reuse one allocation)."""
        if not self.on_disk:
            return torch.from_numpy(self._ram[layer][start:stop])
        d = self.dims[layer]
        buf = np.empty((stop - start, d), _DTYPE) if out is None else out[:stop - start]
        with open(self.path(layer), "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
            if shape != (self.n, d) or fortran or dtype != _DTYPE:
                raise ValueError(f"{self.path(layer)} holds {dtype} {shape}, expected float32 "
                                 f"({self.n}, {d}); delete it to extract it again")
            f.seek(start * d * _DTYPE.itemsize, os.SEEK_CUR)
            got = f.readinto(memoryview(buf).cast("B"))
        if got != buf.nbytes:
            raise ValueError(f"{self.path(layer)} is truncated; delete it to extract it again")
        return torch.from_numpy(buf)

    def drop(self, layer: int) -> None:
        """Frees probe ``layer`` (removes its file)."""
        if self.on_disk:
            remove_with_record(self.path(layer))
            self._checked.discard(layer)
        else:
            self._ram.pop(layer, None)


def plan_passes(layers, dims, n: int, budget: int) -> list[list[int]]:
    """Splits ``layers`` (probe indices, ascending) into passes whose embeddings
    (``n * D * 4`` bytes each) fit ``budget`` together: as few passes as the budget allows,
    each a run of consecutive probes of ``layers``. ValueError when one probe alone does
    not fit."""
    passes: list[list[int]] = []
    size = budget + 1
    for layer in layers:
        need = n * int(dims[layer]) * _DTYPE.itemsize
        if need > budget:
            raise ValueError(f"probe {layer} needs {need / 2**30:.2f} GiB of embeddings "
                             f"({n} x {dims[layer]} float32), more than the "
                             f"{budget / 2**30:.2f} GiB available")
        if size + need > budget:
            passes.append([])
            size = 0
        passes[-1].append(layer)
        size += need
    return passes


def sub_spec(spec: ProbeSpec, layers) -> ProbeSpec:
    """The probes ``layers`` (indices into ``spec.names``, ascending) of ``spec``."""
    names, chosen = spec.names, set(layers)
    first = 1 if spec.input else 0
    modules = [m for i, m in enumerate(spec.modules) if first + i in chosen]
    return dataclasses.replace(spec, modules=modules, input=spec.input and 0 in chosen,
                               softmax=spec.softmax and len(names) - 1 in chosen)


@torch.no_grad()
def extract_to_store(model, x, rows, spec: ProbeSpec, layers, store: LayerStore,
                     *, logits: bool, batch_size: int, device, progress: bool = False,
                     desc: str = "extract") -> torch.Tensor | None:
    """One forward pass over the examples in query order that records the probes ``layers``
    of ``spec`` into ``store``. The examples are ``x[rows]`` (``x`` a tensor, ``rows``:
    ``[n]`` example indices in query order, sliced into batches of ``batch_size``), or, with
    ``rows`` None, the input batches ``[B, ...]`` that the iterable ``x`` yields, in query
    order (one forward call per batch). Either way they must be the store's ``n`` rows
    (else ValueError, nothing committed). Unless ``logits`` is asked for, the forward stops
    after the last probe recorded.

    Returns the ``[n, C]`` float32 logits (with ``logits=True``), else None."""
    layers = sorted(layers)
    part = sub_spec(spec, layers)
    pin = torch.device(device).type == "cuda"
    out: list[torch.Tensor] = []
    if rows is None:
        batches, total = iter(x), None
    else:
        rows = torch.as_tensor(np.asarray(rows))
        batches = (x[rows[b0:b0 + batch_size]] for b0 in range(0, rows.shape[0], batch_size))
        total = -(-rows.shape[0] // batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=total, desc=desc, unit="batch", leave=False)
    was_training = model.training
    model.eval()
    try:
        for layer in layers:
            store.open(layer)
        seen = 0
        with ProbeRecorder(model, part, storage="cpu", truncate=not logits) as rec:
            for xb in batches:
                seen += int(xb.shape[0])
                if seen > store.n:
                    break
                xb = pinned(xb, device)
                recorded, lg = rec.run(xb.to(device, non_blocking=pin))
                for layer, t in zip(layers, recorded, strict=True):
                    store.write(layer, t)
                if logits:
                    out.append(lg)
        if seen != store.n:
            got = f"more than {store.n}" if seen > store.n else str(seen)
            raise ValueError(f"{desc}: the inputs yielded {got} rows, expected {store.n}")
        for layer in layers:
            store.commit(layer)
    except BaseException:
        store.abort()
        raise
    finally:
        model.train(was_training)
    return torch.cat(out) if logits else None


def layer_knn(store: LayerStore, layer: int, labels: torch.Tensor, *, k: int,
              num_classes: int, self_index: torch.Tensor | None, memory_budget: int | None,
              filter: str = "auto", device=None, counts: bool = False,
              progress: bool = False, desc: str = "k-NN") -> LayerVote:
    """The k-NN vote (:class:`LayerVote`: ``pred [n]``, with ``counts [n, C]`` if
    ``counts``) of every row of probe ``layer`` against its first ``N = len(labels)`` rows
    (the support set, labels ``[N]`` int64), excluding ``self_index`` (``[n]``, -1 for
    none).

    When the support rows are the first N queries with their own rows excluded
    (``self_index[:N] == arange(N)``, -1 after: the protocol's training split), they are
    scored against themselves by the symmetric op (:func:`pdepth.ops.knn_sym`, each pair's
    cross term and key once): in one call from RAM, or from a file in support blocks of up
    to half of what ``memory_budget`` leaves after their running top-k, each block against
    itself and each pair of blocks once, merged with ``prev=`` (:func:`self_block_rows`).
    The other rows (all of them otherwise) go as before: a RAM store in one block, a file in
    blocks, queries up to half of ``memory_budget`` and support rows up to the other half (a
    support set that fits one block is read once); each query block's running top-k is
    merged over the support blocks with the op's streaming mode, which is exact
    (docs/design.md section 8), so the blocks never change the result (section 13: nor does
    the symmetric path). ``progress`` shows a bar over the blocks of a disk store (a RAM
    store's calls have no steps to show)."""
    n, d = store.n, store.dims[layer]
    n_support = int(labels.shape[0])
    n_self = _self_rows(self_index, n_support)
    q_rows, s_rows = block_rows(store, layer, n_support, k, memory_budget)
    t_rows = self_block_rows(store, layer, n_self, k, memory_budget)
    bar = None
    if progress and store.on_disk:
        from tqdm.auto import tqdm

        blocks = -(-n_self // t_rows) if n_self else 0
        total = blocks * (blocks + 1) // 2 + -(-(n - n_self) // q_rows) * -(-n_support // s_rows)
        bar = tqdm(total=total, desc=desc, unit="block", leave=False)
    votes = []
    if n_self:
        votes += _self_votes(store, layer, labels, n_self, t_rows, k=k, num_classes=num_classes,
                             filter=filter, device=device, counts=counts, bar=bar)
    q_buf = s_buf = None
    if store.on_disk and n_self < n:  # one allocation per block kind, reused
        q_buf = np.empty((q_rows, d), _DTYPE)
        if q_rows < n:
            s_buf = np.empty((s_rows, d), _DTYPE)
    held = None  # the support block last read, reused while it is the same
    for q0 in range(n_self, n, q_rows):
        q1 = min(n, q0 + q_rows)
        q = _on(store.rows(layer, q0, q1, q_buf), device)
        sidx = None if self_index is None else self_index[q0:q1].to(q.device)
        top = empty_topk(q1 - q0, k, torch.float32, q.device)
        for s0 in range(0, n_support, s_rows):
            s1 = min(n_support, s0 + s_rows)
            if s0 == 0 and s1 <= q1 and q0 == 0:
                s = q[:s1]  # the support rows are the first query rows: no second read
            elif held is not None and held[0] == s0:
                s = held[1]  # the whole support set is one block: read once, not per query block
            else:
                s = _on(store.rows(layer, s0, s1, s_buf), device)
                held = (s0, s)
            top = knn(q, s, k, self_index=sidx, self_match="exclude", prev=top, offset=s0,
                      filter=filter)
            if bar is not None:
                bar.update()
        votes += LocalSupport().finish([top], labels.to(q.device), k=k,
                                       num_classes=num_classes, self_index=sidx, row0=q0,
                                       counts=counts)
    if bar is not None:
        bar.close()
    return LayerVote(torch.cat([v.pred for v in votes]),
                     torch.cat([v.counts for v in votes]) if counts else None)


def _self_rows(self_index: torch.Tensor | None, n_support: int) -> int:
    """N when the first N rows are the support set excluding its own rows and no later row
    has a self match (the symmetric path applies to them), else 0."""
    if self_index is None or n_support == 0 or self_index.shape[0] < n_support:
        return 0
    si = self_index.cpu()
    own = torch.equal(si[:n_support], torch.arange(n_support, dtype=si.dtype))
    return n_support if own and bool((si[n_support:] < 0).all()) else 0


def _self_votes(store: LayerStore, layer: int, labels: torch.Tensor, n_self: int,
                t_rows: int, *, k: int, num_classes: int, filter: str, device, counts: bool,
                bar) -> list[LayerVote]:
    """The votes of rows ``0..n_self-1`` against themselves (self excluded) by the symmetric
    op, in blocks of ``t_rows``: each block against itself, then against every later block
    (:func:`pdepth.ops.knn_sym` with ``other=``), the running top-k of every row merged with
    ``prev=``. Two block buffers, swapped so that a block still held is not read again."""
    bounds = [(b0, min(n_self, b0 + t_rows)) for b0 in range(0, n_self, t_rows)]
    bufs = [None, None]
    if store.on_disk:
        bufs = [np.empty((t_rows, store.dims[layer]), _DTYPE) if i < len(bounds) else None
                for i in range(2)]
    held = [None, None]  # (block, tensor) in each buffer

    def read(block: int, slot: int) -> torch.Tensor:
        if held[slot] is None or held[slot][0] != block:
            b0, b1 = bounds[block]
            held[slot] = (block, _on(store.rows(layer, b0, b1, bufs[slot]), device))
        return held[slot][1]

    where = torch.device("cpu") if device is None else torch.device(device)
    tops = [empty_topk(b1 - b0, k, torch.float32, where) for b0, b1 in bounds]
    for a, (a0, a1) in enumerate(bounds):
        if held[1] is not None and held[1][0] == a:  # the block is in the other buffer
            held.reverse()
            bufs.reverse()
        x = read(a, 0)
        tops[a] = knn_sym(x, k, prev=tops[a], offset=a0, filter=filter)
        if bar is not None:
            bar.update()
        for b in range(a + 1, len(bounds)):
            b0, b1 = bounds[b]
            prev = (torch.cat([tops[a].dist, tops[b].dist]),
                    torch.cat([tops[a].index, tops[b].index]))
            both = knn_sym(x, k, other=read(b, 1), prev=prev, offset=a0, other_offset=b0,
                           filter=filter)
            tops[a] = Neighbors(both.dist[:a1 - a0], both.index[:a1 - a0])
            tops[b] = Neighbors(both.dist[a1 - a0:], both.index[a1 - a0:])
            if bar is not None:
                bar.update()
    votes = []
    for (a0, _), top in zip(bounds, tops, strict=True):
        votes += LocalSupport().finish([top], labels.to(top.index.device), k=k,
                                       num_classes=num_classes, row0=a0, counts=counts)
    return votes


def block_rows(store: LayerStore, layer: int, n_support: int, k: int,
               memory_budget: int | None) -> tuple[int, int]:
    """``(query rows, support rows)`` per block of :func:`layer_knn`'s general path:
    everything for a RAM store, else half of ``memory_budget`` for the support block and the
    other half for the query block together with the op's running top-k of each query
    (``k`` entries)."""
    n, row = store.n, store.dims[layer] * _DTYPE.itemsize
    if not store.on_disk or memory_budget is None:
        return n, n_support
    half = int(memory_budget) // 2
    return (max(1, min(n, half // (row + k * _TOPK_BYTES))),
            max(1, min(n_support, half // row)))


def self_block_rows(store: LayerStore, layer: int, n_self: int, k: int,
                    memory_budget: int | None) -> int:
    """Rows per block of :func:`layer_knn`'s symmetric path (the support set against
    itself): all ``n_self`` for a RAM store, else half of what ``memory_budget`` leaves
    after the running top-k of all ``n_self`` rows (two blocks are held at once)."""
    if not store.on_disk or memory_budget is None or n_self == 0:
        return max(n_self, 1)
    row = store.dims[layer] * _DTYPE.itemsize
    rest = int(memory_budget) - n_self * k * _TOPK_BYTES
    return max(1, min(n_self, rest // 2 // row))


def block_bytes(store: LayerStore, layer: int, n_support: int, k: int,
                memory_budget: int | None) -> int:
    """The bytes of embeddings :func:`layer_knn` holds at once for probe ``layer`` (the
    larger of its two paths' blocks)."""
    q_rows, s_rows = block_rows(store, layer, n_support, k, memory_budget)
    if not store.on_disk:
        return store.nbytes(layer)
    t_rows = self_block_rows(store, layer, n_support, k, memory_budget)
    pair = min(2 * t_rows, n_support)
    return max(q_rows + (s_rows if q_rows < store.n else 0), pair) * store.dims[layer] \
        * _DTYPE.itemsize


def _on(t: torch.Tensor, device) -> torch.Tensor:
    return t if device is None else t.to(device)

