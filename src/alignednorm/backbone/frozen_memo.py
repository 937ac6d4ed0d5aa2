"""A bounded memo of the image tower's frozen passes, for runs that see the same batches.

Runs of two methods on one dataset and seed (MMRL++ and AlignedNorm in a base-to-new sweep) draw the
same training batches and evaluate the same test batches. Their prompt-free prefix (blocks before J)
and their frozen teacher (the rest of the tower from that prefix, no prompts) are then the same
numbers, computed twice. With a memo on the backbone, a later run takes them from an earlier one.

Exact by construction: an entry is found by the bytes of the input images (a 128-bit BLAKE2 digest),
the block it stops at, the thread count and a signature of the tower's weights (their in-place
version counters, so an optimiser step or a ``copy_`` into any weight misses). Only CPU tensors are
keyed (hashing device memory would cost a copy); elsewhere the memo is silent. The backbone consults
it only under ``no_grad`` with no autocast and no trace asking for what the prefix blocks hold.
Entries leave oldest first once ``max_bytes`` is reached.

What is kept is copied into large blocks allocated for the purpose: kept in place, the small tensors a
step leaves behind would scatter the allocator's heap, and a tiny model's step, whose temporaries
otherwise reuse the same warm memory every step, measured 7 % slower. Only the teacher's features are
kept of the continuation: keeping its token states as well measured 3 % slower for the earlier run.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class _Entry:
    states: Tensor
    layer: int
    signature: int
    nbytes: int
    continuation: Tensor | None = None  # the features the frozen rest of the tower made of ``states``


@dataclass
class FrozenPassMemo:
    """Prefix states and frozen continuations by input content (see the module docstring).

    Attributes:
        weights: the tower's parameters; an in-place change to any of them invalidates every entry.
        max_bytes: the most tensor memory the entries may hold.
        hits, misses: lookups of prefixes and continuations answered from the memo or not.
        nbytes: the tensor memory the entries hold now.
    """

    weights: list[Tensor]
    max_bytes: int
    hits: int = 0
    misses: int = 0
    nbytes: int = 0
    _entries: OrderedDict = field(default_factory=OrderedDict)
    _by_states: dict = field(default_factory=dict)
    _block: Tensor | None = None
    _block_used: int = 0

    @staticmethod
    def key(images: Tensor, upto: int) -> tuple | None:
        """The content key of a prefix of ``images`` up to block ``upto``; None where the memo cannot apply."""
        if images.device.type != "cpu" or images.requires_grad:
            return None
        digest = hashlib.blake2b(images.detach().contiguous().numpy().tobytes(), digest_size=16).digest()
        return upto, tuple(images.shape), str(images.dtype), torch.get_num_threads(), digest

    def signature(self) -> int:
        """Changes whenever any weight is modified in place (the sum of their version counters)."""
        return sum(w._version for w in self.weights)

    def prefix(self, key: tuple) -> Tensor | None:
        """The stored prefix states for ``key``, computed with the weights as they are now, or None."""
        entry = self._entries.get(key)
        if entry is None or entry.signature != self.signature():
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.states

    def store_prefix(self, key: tuple, states: Tensor) -> Tensor:
        """Keep ``states`` for ``key``; returns the kept copy (continue from it, so its continuation is kept too)."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._forget(old)
        states = self._keep(states)
        entry = _Entry(states, key[0], self.signature(), states.nbytes)
        self._entries[key] = entry
        self._by_states[id(states)] = key
        self.nbytes += entry.nbytes
        self._evict()
        return states

    def continuation(self, states: Tensor, layer: int) -> Tensor | None:
        """The features the frozen rest of the tower made of these very ``states`` (a stored prefix), or None."""
        entry = self._entry_of(states, layer)
        if entry is None:
            return None
        if entry.continuation is None or entry.signature != self.signature():
            self.misses += 1
            return None
        self.hits += 1
        return entry.continuation

    def store_continuation(self, states: Tensor, layer: int, features: Tensor) -> Tensor:
        """Keep ``features`` beside the stored prefix ``states``; returns what to use (the kept copy)."""
        entry = self._entry_of(states, layer)
        if entry is None or entry.signature != self.signature() or entry.continuation is not None:
            return features
        entry.continuation = self._keep(features)
        entry.nbytes += features.nbytes
        self.nbytes += features.nbytes
        self._evict()
        return entry.continuation

    def _entry_of(self, states: Tensor, layer: int) -> _Entry | None:
        key = self._by_states.get(id(states))
        entry = None if key is None else self._entries.get(key)
        return entry if entry is not None and entry.states is states and entry.layer == layer else None

    def _keep(self, tensor: Tensor) -> Tensor:
        """A copy of ``tensor`` in the current block (a new block when it is full; a block lives while a copy does)."""
        if not tensor.is_contiguous():
            return tensor
        size = -(-tensor.nbytes // 64) * 64  # 64-byte aligned, whatever the dtype
        if self._block is None or self._block_used + size > self._block.numel():
            self._block, self._block_used = torch.empty(max(BLOCK_BYTES, size), dtype=torch.uint8), 0
        start, self._block_used = self._block_used, self._block_used + size
        kept = self._block[start : start + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        return kept.copy_(tensor)

    def _forget(self, entry: _Entry) -> None:
        self._by_states.pop(id(entry.states), None)
        self.nbytes -= entry.nbytes

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self._entries:
            self._forget(self._entries.popitem(last=False)[1])


BLOCK_BYTES = 8 << 20


def autocast_on_cpu() -> bool:
    """Whether CPU autocast is on (it would change what a pass computes)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()
