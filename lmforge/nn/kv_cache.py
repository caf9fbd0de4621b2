"""`KVCache`: the keys and values a model keeps between forward passes, for every layer and row.

One forward pass over T new tokens per row:

    write = cache.begin(T, pad_mask_BT)                  # where each row's new tokens go
    k_BKSD, v_BKSD = cache.write(layer, k_BKTD, v_BKTD)  # every layer: store them, get what to attend over
    cache.advance(T)                                     # after the last layer: every row grew by T

`read(layer)` gives a layer's stored keys and values.

Every row has its own length. `LLM.generate` and beam search keep the rows equal (left padding
is recorded as slots without a token); the serving scheduler gives each running sequence a row of
its own and works on a contiguous range of rows (`rows`), compacting them with `move` / `release`.
`reorder` makes surviving beams take their parents' rows; `truncate` drops the newest positions
(rolling back rejected speculative tokens). Keys and values are stored and returned in the cache's
`dtype` (`kv_cache_dtype`: bf16 halves the memory; the decoder then attends in bf16). Nothing
outside this class touches its tensors.

Shape suffixes: L layers, N all rows of the cache, B the rows of this cache (a view's range),
K key/value heads, S slots (positions), T new tokens, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lmforge.errors import LMForgeError

# `--kv-cache-dtype` (vLLM's flag): "auto" stores keys and values in the model's dtype.
KV_CACHE_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


def kv_cache_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype a `kv_cache_dtype` setting names (None: the model's dtype)."""
    if name is None:
        return None
    if name not in KV_CACHE_DTYPES:
        raise LMForgeError(f"kv_cache_dtype must be 'auto', 'fp32' or 'bf16', got {name!r}")
    return KV_CACHE_DTYPES[name]


@dataclass(frozen=True)
class CacheWrite:
    """Where one forward pass puts its T new tokens, and what they attend over."""

    start: int | None  # the first new slot of every row, when all rows have the same length
    start_B: torch.Tensor | None  # else each row's own first new slot (B,)
    end: int  # slots 0..end-1 are attended over: the longest row after the write
    valid_BS: torch.Tensor | None  # (B, end) True where a slot holds a token; None: every slot below a row's length does
    rows_B1: torch.Tensor | None = None  # with start_B: the cache rows and slots written, for every layer
    slots_BT: torch.Tensor | None = None


class _Storage:
    """The tensors and per-row state that a cache and its row views share."""

    def __init__(self, k_LNKSD: torch.Tensor, v_LNKSD: torch.Tensor):
        self.k_LNKSD, self.v_LNKSD = k_LNKSD, v_LNKSD
        self.lengths = [0] * k_LNKSD.shape[1]  # slots filled, per row
        self.valid_NS: torch.Tensor | None = None  # which slots hold tokens; made when a row first has padding


class KVCache:
    """Preallocated keys and values of `n_layer` layers for `batch` rows of up to `max_len` slots."""

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        k_LNKSD = torch.zeros(n_layer, batch, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        self._init_view(_Storage(k_LNKSD, torch.zeros_like(k_LNKSD)), 0, batch)

    def _init_view(self, storage: _Storage, row0: int, batch: int) -> None:
        self._s = storage
        self._row0, self.batch = row0, batch
        self._pending: CacheWrite | None = None
        self.max_len = storage.k_LNKSD.shape[3]

    # ---- state ---------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self._s.k_LNKSD.dtype

    @property
    def device(self) -> torch.device:
        return self._s.k_LNKSD.device

    @property
    def lengths(self) -> list[int]:
        """Slots filled in each row."""
        return self._s.lengths[self._row0:self._row0 + self.batch]

    @property
    def length(self) -> int:
        """The length of every row, for a cache whose rows grow together (generate, beam search)."""
        lengths = self.lengths
        if min(lengths) != max(lengths):
            raise ValueError(f"the rows of this cache have different lengths ({lengths}); use `lengths`")
        return lengths[0]

    def nbytes(self) -> int:
        k = self._s.k_LNKSD
        return 2 * k[:, self._row0:self._row0 + self.batch].numel() * k.element_size()

    # ---- one forward pass ----------------------------------------------------------------------

    def begin(self, T: int, pad_mask_BT: torch.Tensor | None = None) -> CacheWrite:
        """Plan the write of T new tokens after each row's current length. `pad_mask_BT` marks which
        of them are tokens (False: left padding, never attended to and not counted in positions)."""
        s, r0, r1 = self._s, self._row0, self._row0 + self.batch
        lengths = s.lengths[r0:r1]
        lo, hi = min(lengths), max(lengths)
        end = hi + T
        if end > self.max_len:
            raise LMForgeError(f"sequence of {end} tokens is longer than the context ({self.max_len})")
        start = lo if lo == hi else None
        start_B = rows_B1 = slots_BT = None
        if start is None:
            start_B = torch.tensor(lengths, device=self.device)
            rows_B1 = torch.arange(r0, r1, device=self.device)[:, None]
            slots_BT = start_B[:, None] + torch.arange(T, device=self.device)[None]
        if pad_mask_BT is not None and s.valid_NS is None and not bool(pad_mask_BT.all()):
            slots_S = torch.arange(self.max_len, device=self.device)
            s.valid_NS = slots_S[None] < torch.tensor(s.lengths, device=self.device)[:, None]
        valid_BS = None
        if s.valid_NS is not None:
            new_BT = pad_mask_BT if pad_mask_BT is not None else True
            if start is not None:
                s.valid_NS[r0:r1, start:end] = new_BT
            else:
                s.valid_NS[r0:r1].scatter_(1, slots_BT, new_BT)
            valid_BS = s.valid_NS[r0:r1, :end]
        self._pending = CacheWrite(start, start_B, end, valid_BS, rows_B1, slots_BT)
        return self._pending

    def write(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys and values at the slots `begin` planned; returns the keys and
        values to attend over (B, K, end, D), in the cache's dtype."""
        w = self._pending
        if w is None:
            raise RuntimeError("KVCache.write before begin()")
        r0, r1 = self._row0, self._row0 + self.batch
        k_NKSD, v_NKSD = self._s.k_LNKSD[layer], self._s.v_LNKSD[layer]
        if w.start is not None:  # one slice per row range (generate, beams, a scheduler prefill chunk)
            T = k_BKTD.shape[2]
            k_NKSD[r0:r1, :, w.start:w.start + T] = k_BKTD  # copy_ casts to the cache's dtype
            v_NKSD[r0:r1, :, w.start:w.start + T] = v_BKTD
        else:  # each row at its own slots (a scheduler decode step)
            k_NKSD[w.rows_B1, :, w.slots_BT] = k_BKTD.transpose(1, 2).to(self.dtype)
            v_NKSD[w.rows_B1, :, w.slots_BT] = v_BKTD.transpose(1, 2).to(self.dtype)
        return k_NKSD[r0:r1, :, :w.end], v_NKSD[r0:r1, :, :w.end]

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values (B, K, S, D) over slots 0..S-1, S the longest row (stored dtype)."""
        r0, r1, S = self._row0, self._row0 + self.batch, max(self.lengths)
        return self._s.k_LNKSD[layer, r0:r1, :, :S], self._s.v_LNKSD[layer, r0:r1, :, :S]

    def advance(self, n: int) -> None:
        """Every row grew by n slots (after every layer wrote them)."""
        lengths = self._s.lengths
        for r in range(self._row0, self._row0 + self.batch):
            lengths[r] += n
        self._pending = None

    # ---- rows ------------------------------------------------------------------------------------

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows start..stop-1 as a cache of their own, sharing this one's tensors and lengths."""
        if not 0 <= start < stop <= self.batch:
            raise ValueError(f"rows {start}..{stop - 1} are outside a cache of {self.batch} rows")
        view = KVCache.__new__(KVCache)
        view._init_view(self._s, self._row0 + start, stop - start)
        return view

    def release(self, row: int) -> None:
        """Empty a row (its slots are overwritten by whatever is written there next)."""
        self._s.lengths[self._row0 + row] = 0

    def move(self, src: int, dst: int) -> None:
        """Row dst takes row src's keys, values and length; src becomes empty."""
        s, src, dst = self._s, self._row0 + src, self._row0 + dst
        n = s.lengths[src]
        s.k_LNKSD[:, dst, :, :n] = s.k_LNKSD[:, src, :, :n]
        s.v_LNKSD[:, dst, :, :n] = s.v_LNKSD[:, src, :, :n]
        if s.valid_NS is not None:
            s.valid_NS[dst, :n] = s.valid_NS[src, :n]
        s.lengths[dst], s.lengths[src] = n, 0

    def reorder(self, rows_B: Sequence[int] | torch.Tensor) -> None:
        """Row i takes the contents of row rows_B[i] (beam search: each surviving beam continues
        from its parent's keys and values)."""
        s, r0, r1 = self._s, self._row0, self._row0 + self.batch
        idx_B = torch.as_tensor(rows_B, dtype=torch.long, device=self.device)
        old = s.lengths[r0:r1]
        s.lengths[r0:r1] = [old[i] for i in idx_B.tolist()]
        if r0 == 0 and r1 == s.k_LNKSD.shape[1]:  # the whole cache: take the gathered tensors as they are
            s.k_LNKSD, s.v_LNKSD = s.k_LNKSD.index_select(1, idx_B), s.v_LNKSD.index_select(1, idx_B)
            if s.valid_NS is not None:
                s.valid_NS = s.valid_NS.index_select(0, idx_B)
            return
        s.k_LNKSD[:, r0:r1] = s.k_LNKSD.index_select(1, idx_B + r0)
        s.v_LNKSD[:, r0:r1] = s.v_LNKSD.index_select(1, idx_B + r0)
        if s.valid_NS is not None:
            s.valid_NS[r0:r1] = s.valid_NS.index_select(0, idx_B + r0)

    def truncate(self, n: int) -> None:
        """Drop the newest n positions of every row (speculative decoding: rejected draft tokens)."""
        lengths = self.lengths
        if not 0 <= n <= min(lengths):
            raise ValueError(f"cannot drop {n} positions from rows of lengths {lengths}")
        for r in range(self._row0, self._row0 + self.batch):
            self._s.lengths[r] -= n
