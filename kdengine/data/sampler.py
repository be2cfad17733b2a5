"""Length-grouped batch sampler (the idea of LLaVA's group_by_modality_length).

Per epoch, with a generator seeded by ``seed + epoch``:

1. split indices by modality (with images / text-only) and shuffle each group;
2. cut each group into windows of ``mega_batch * G`` samples (G = batch_size * world_size),
   sort each window by length (longest first) and cut it into global batches of G;
3. the leftovers of both groups (< G each) form mixed batches; a last partial batch is
   dropped (``drop_last``), kept short (one rank), or filled up by repeating samples
   from the start of the epoch's order (several ranks, so all ranks step together);
4. shuffle the order of the global batches; rank r takes slice ``[r*B, (r+1)*B)`` of each.

So every global batch except at most one is single-modality and of similar lengths, and
the ranks' batches in one step are of similar lengths too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches of dataset indices; use as ``DataLoader(batch_sampler=...)``.

    Args:
        lengths: token length of each sample (e.g. ``LlavaDataset.lengths``).
        batch_size: samples per batch on one rank.
        is_multimodal: per sample, has it images (``LlavaDataset.is_multimodal``);
            None groups by length only.
        world_size, rank: data-parallel size and this process's rank.
        seed: base seed; call :meth:`set_epoch` each epoch for a new order.
        mega_batch: global batches per sorting window (larger: less padding, less randomness).
        drop_last: drop the last partial global batch instead of shortening or filling it.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        is_multimodal: Sequence[bool] | None = None,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        mega_batch: int = 8,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        if mega_batch < 1:
            raise ValueError(f"mega_batch={mega_batch}: expected >= 1")
        if is_multimodal is not None and len(is_multimodal) != len(lengths):
            raise ValueError(f"is_multimodal has {len(is_multimodal)} entries, lengths {len(lengths)}: expected equal")
        if len(lengths) == 0:
            raise ValueError("lengths is empty: expected at least one sample")
        self.lengths = list(lengths)
        self.is_multimodal = list(is_multimodal) if is_multimodal is not None else None
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.mega_batch = mega_batch
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _groups(self) -> list[list[int]]:
        n = len(self.lengths)
        if self.is_multimodal is None:
            return [list(range(n))]
        mm = [i for i in range(n) if self.is_multimodal[i]]
        text = [i for i in range(n) if not self.is_multimodal[i]]
        return [g for g in (mm, text) if g]

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (each of G = batch_size * world_size indices, the last maybe fewer)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        G = self.batch_size * self.world_size
        window = G * self.mega_batch

        def by_len(idx: list[int]) -> list[int]:  # longest first; stable, so ties keep the shuffled order
            return sorted(idx, key=lambda i: -self.lengths[i])

        batches, leftovers, order = [], [], []
        for group in self._groups():
            perm = [group[i] for i in torch.randperm(len(group), generator=g).tolist()]
            order += perm
            for w in range(0, len(perm), window):
                chunk = by_len(perm[w : w + window])
                n_full = len(chunk) // G * G
                batches += [chunk[k : k + G] for k in range(0, n_full, G)]
                leftovers += chunk[n_full:]
        leftovers = by_len(leftovers)
        n_full = len(leftovers) // G * G
        batches += [leftovers[k : k + G] for k in range(0, n_full, G)]
        tail = leftovers[n_full:]
        if tail and not self.drop_last:
            if self.world_size > 1:  # every rank needs a full batch
                fill = [order[k % len(order)] for k in range(G - len(tail))]
                tail = tail + fill
            batches.append(tail)
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        B, r = self.batch_size, self.rank
        for gb in self.global_batches():
            yield gb[r * B : (r + 1) * B]

    def __len__(self) -> int:
        G = self.batch_size * self.world_size
        sizes = [len(grp) for grp in self._groups()]
        n = sum(s // G for s in sizes)
        left = sum(s % G for s in sizes)
        n += left // G
        if left % G and not self.drop_last:
            n += 1
        return n
