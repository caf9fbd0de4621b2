"""The KV-cache interface (write at per-row positions, advance, read, row views, move/release,
reorder, truncate, dtype) and the attention context built from it, with exact tensors."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LMForgeError
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.layers import causal_context, packed_context


def kv(values: list[float], K: int = 1, D: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (1, K, T, D) whose every entry of token t is values[t]; values are the keys + 100."""
    k_1KTD = torch.tensor(values).view(1, 1, -1, 1).expand(1, K, -1, D).clone()
    return k_1KTD, k_1KTD + 100


def fill(cache: KVCache, row: int, values: list[float], layer: int = 0) -> None:
    """One forward pass of len(values) tokens on one row (a single-layer model)."""
    view = cache.rows(row, row + 1)
    view.begin(len(values))
    view.write(layer, *kv(values))
    view.advance(len(values))


def stored(cache: KVCache) -> list[list[float]]:
    """Layer 0's keys per row, one number per slot (head 0, dim 0), over the longest row."""
    return cache.read(0)[0][:, 0, :, 0].tolist()


def test_write_at_per_row_positions_and_advance():
    cache = KVCache(n_layer=1, batch=3, n_kv_head=1, max_len=6, head_dim=2)
    fill(cache, 0, [1, 2, 3])
    fill(cache, 1, [4])
    fill(cache, 2, [5, 6])
    assert cache.lengths == [3, 1, 2]
    w = cache.begin(1)
    assert w.start is None and w.start_B.tolist() == [3, 1, 2] and w.end == 4 and w.valid_BS is None
    k_BKTD = torch.tensor([7.0, 8.0, 9.0]).view(3, 1, 1, 1).expand(3, 1, 1, 2)
    k_BKSD, v_BKSD = cache.write(0, k_BKTD, k_BKTD + 100)
    cache.advance(1)
    # each row's new key lands right after its own tokens; slots past a row's length stay as they were
    want = [[1, 2, 3, 7], [4, 8, 0, 0], [5, 6, 9, 0]]
    assert k_BKSD[:, 0, :, 0].tolist() == want and k_BKSD.shape == (3, 1, 4, 2)
    assert torch.equal(v_BKSD, k_BKSD + torch.tensor(want).ne(0).float()[:, None, :, None] * 100)
    assert cache.lengths == [4, 2, 3] and stored(cache) == want
    # rows of equal length take one slice write
    even = KVCache(n_layer=2, batch=2, n_kv_head=1, max_len=4, head_dim=2)
    w = even.begin(2)
    assert (w.start, w.start_B, w.end) == (0, None, 2)
    assert even.length == 0
    with pytest.raises(ValueError, match=r"the rows of this cache have different lengths \(\[4, 2, 3\]\)"):
        cache.length


def test_rows_view_shares_storage_and_lengths():
    cache = KVCache(n_layer=1, batch=4, n_kv_head=1, max_len=5, head_dim=2)
    view = cache.rows(1, 3)
    assert view.batch == 2 and view.lengths == [0, 0]
    view.begin(2)
    k, v = torch.arange(8.0).view(2, 1, 2, 2), torch.arange(8.0).view(2, 1, 2, 2) + 100
    view.write(0, k, v)
    view.advance(2)
    assert cache.lengths == [0, 2, 2, 0]
    assert torch.equal(cache.rows(1, 3).read(0)[0], k) and torch.equal(cache.rows(1, 3).read(0)[1], v)
    assert cache.nbytes() == 2 * 4 * 5 * 2 * 4 and view.nbytes() == 2 * 2 * 5 * 2 * 4
    with pytest.raises(ValueError, match=r"rows 3\.\.4 are outside a cache of 4 rows"):
        cache.rows(3, 5)


def test_move_and_release_slots():
    cache = KVCache(n_layer=1, batch=3, n_kv_head=1, max_len=4, head_dim=2)
    fill(cache, 0, [1, 2])
    fill(cache, 1, [3])
    fill(cache, 2, [4, 5, 6])
    cache.move(2, 0)  # the last row refills a finished sequence's row
    assert cache.lengths == [3, 1, 0]
    assert stored(cache.rows(0, 2)) == [[4, 5, 6], [3, 0, 0]]
    cache.release(1)
    assert cache.lengths == [3, 0, 0]
    fill(cache, 1, [7, 8])  # a released row starts again at slot 0
    assert stored(cache.rows(1, 2)) == [[7, 8]] and cache.lengths == [3, 2, 0]


def test_reorder_rows_for_beams():
    cache = KVCache(n_layer=2, batch=3, n_kv_head=1, max_len=4, head_dim=2)
    for layer in (0, 1):
        cache.begin(2)
        cache.write(layer, torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2) + layer * 10,
                    torch.zeros(3, 1, 2, 2))
    cache.advance(2)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.read(0)[0][:, 0, :, 0].tolist() == [[3, 3], [3, 3], [1, 1]]
    assert cache.read(1)[0][:, 0, :, 0].tolist() == [[13, 13], [13, 13], [11, 11]]
    # a view reorders its own rows in place and leaves the others alone
    view = cache.rows(1, 3)
    view.reorder([1, 0])
    assert stored(cache) == [[3, 3], [1, 1], [3, 3]]


def test_truncate_rolls_back_positions():
    cache = KVCache(n_layer=1, batch=2, n_kv_head=1, max_len=6, head_dim=2)
    cache.begin(4)
    cache.write(0, torch.arange(1.0, 5.0).view(1, 1, 4, 1).expand(2, 1, 4, 2), torch.zeros(2, 1, 4, 2))
    cache.advance(4)
    cache.truncate(2)  # two rejected draft tokens
    assert cache.lengths == [2, 2]
    w = cache.begin(1)
    assert w.start == 2 and w.end == 3
    k_BKSD, _ = cache.write(0, torch.full((2, 1, 1, 2), 9.0), torch.zeros(2, 1, 1, 2))
    cache.advance(1)
    assert k_BKSD[:, 0, :, 0].tolist() == [[1, 2, 9], [1, 2, 9]] and stored(cache) == [[1, 2, 9], [1, 2, 9]]
    with pytest.raises(ValueError, match=r"cannot drop 4 positions from rows of lengths \[3, 3\]"):
        cache.truncate(4)


def test_bf16_cache_stores_and_returns_bf16():
    """The decoder attends over a bf16 cache in bf16 (no upcast copy of the cache per step)."""
    cache = KVCache(n_layer=1, batch=2, n_kv_head=1, max_len=3, head_dim=2, dtype=torch.bfloat16)
    assert cache.dtype == torch.bfloat16 and cache.nbytes() == 2 * 2 * 3 * 2 * 2
    k = torch.tensor([[[[1.001, 2.0], [3.0, 4.0]]]]).expand(2, 1, 2, 2)
    cache.begin(2)
    k_BKSD, v_BKSD = cache.write(0, k, k)
    cache.advance(2)
    assert k_BKSD.dtype == torch.bfloat16 and torch.equal(k_BKSD, k.bfloat16())
    cache.rows(1, 2).truncate(1)  # rows of different lengths: the per-row write path
    cache.begin(1)
    k_BKSD, _ = cache.write(0, torch.full((2, 1, 1, 2), 5.001), torch.zeros(2, 1, 1, 2))
    assert k_BKSD.dtype == torch.bfloat16 and k_BKSD[1, 0, 1].tolist() == [5.0, 5.0]
    assert cache.read(0)[0].dtype == torch.bfloat16


def test_overflow_and_write_before_begin_are_errors():
    cache = KVCache(n_layer=1, batch=1, n_kv_head=1, max_len=3, head_dim=2)
    with pytest.raises(RuntimeError, match=r"KVCache.write before begin\(\)"):
        cache.write(0, *kv([1]))
    with pytest.raises(LMForgeError, match=r"sequence of 4 tokens is longer than the context \(3\)"):
        cache.begin(4)


def test_left_padding_is_recorded_and_masked():
    cache = KVCache(n_layer=1, batch=2, n_kv_head=1, max_len=4, head_dim=2)
    pad_mask_BT = torch.tensor([[True, True], [False, True]])
    ctx = causal_context(2, 2, torch.device("cpu"), cache=cache, pad_mask_BT=pad_mask_BT)
    assert ctx.pos_BT.tolist() == [[0, 1], [0, 0]] and ctx.length == 2 and ctx.cache is cache
    # a padding slot is never a key, except for itself (no empty softmax row)
    assert ctx.mask[:, 0].tolist() == [[[True, False], [True, True]], [[True, False], [False, True]]]
    cache.advance(2)
    ctx = causal_context(2, 1, torch.device("cpu"), cache=cache)  # the next decode step
    assert ctx.pos_BT.tolist() == [[2], [1]]
    assert ctx.mask[:, 0].tolist() == [[[True, True, True]], [[False, True, True]]]


def test_context_of_rows_with_their_own_lengths():
    cache = KVCache(n_layer=1, batch=3, n_kv_head=1, max_len=8, head_dim=2)
    fill(cache, 0, [1, 2, 3])
    fill(cache, 1, [1])
    fill(cache, 2, [1, 2, 3, 4, 5])
    ctx = causal_context(3, 1, torch.device("cpu"), cache=cache, window=3)
    assert ctx.pos_BT.tolist() == [[3], [1], [5]] and ctx.length == 6 and not ctx.is_causal
    allowed = [[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1]]  # own length, last 3 positions
    assert ctx.mask[:, 0, 0].int().tolist() == allowed
    plain = causal_context(1, 4, torch.device("cpu"))  # no cache, no padding: SDPA's own causal mask
    assert plain.mask is None and plain.is_causal and plain.pos_BT.tolist() == [[0, 1, 2, 3]]


def test_packed_context_restarts_positions_per_segment():
    seg_BT = torch.tensor([[0, 0, 0, 1, 1]])
    ctx = packed_context(seg_BT, window=2)
    assert ctx.pos_BT.tolist() == [[0, 1, 2, 0, 1]] and ctx.length == 5 and ctx.cache is None
    assert ctx.mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0],
                                             [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
