"""A stage's batches: its dataset, and which samples every rank reads at every optimizer step.

A global batch of ``batch_size`` samples per optimizer step comes from
`LengthGroupedBatchSampler` (seeded, length grouped, the last partial batch dropped). Rank r
reads samples ``[r * A * M, (r + 1) * A * M)`` of it as A micro-batches of M
(A = accumulation steps, M = micro_batch_size), so one rank with A = 2 sees exactly the
micro-batches two ranks with A = 1 see. The order is a pure function of (seed, epoch, step):
resuming at step s re-derives it and skips nothing but index lists.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch.utils.data import DataLoader

from kdengine.data import LengthGroupedBatchSampler, LlavaCollator, LlavaDataset, build_dataset
from kdengine.data.records import BadSample
from kdengine.train.config import ConfigError, DatasetConfig, StageConfig
from kdengine.train.dist import DistInfo

__all__ = ["StepPlan", "TrainInputError", "build_stage_dataset", "micro_batches"]


class TrainInputError(ValueError):
    """Input met during training that cannot be trained on (e.g. a micro-batch whose every sample was
    skipped); met by one rank, which reports it (see `kdengine.cli.main`)."""

    rank_local = True


def build_stage_dataset(ds: DatasetConfig, processor, num_image_tokens: int, verbose: bool,
                        context_length: int | None = None, name: str = "?") -> LlavaDataset:
    """The stage's dataset (``datasets.<name>``); every sample fits ``context_length`` (the model's
    max_position_embeddings)."""
    try:
        return build_dataset(
            ds.path, processor.tokenizer, processor.image_processor, image_folder=ds.image_folder,
            template=ds.template, num_image_tokens=num_image_tokens, max_length=ds.max_length,
            truncation=ds.truncation, pad_to_square=ds.pad_to_square, on_bad_sample=ds.on_bad_sample,
            check_images=ds.check_images, verbose=verbose, context_length=context_length,
        )
    except BadSample:
        raise
    except ValueError as err:  # max_length above the model's context, no usable sample, ...
        raise ConfigError(f"datasets.{name}: {err}") from None


@dataclass
class StepPlan:
    """Optimizer steps of one stage and the micro-batches this rank reads at each."""

    sampler: LengthGroupedBatchSampler
    micro: int
    accum: int
    total_steps: int

    @classmethod
    def build(cls, dataset: LlavaDataset, stage: StageConfig, dist: DistInfo, seed: int) -> StepPlan:
        per_step = stage.micro_batch_size * dist.world_size
        if stage.batch_size % per_step:
            raise ValueError(f"stage {stage.name!r}: batch_size {stage.batch_size} is not a multiple of "
                             f"micro_batch_size x world size = {per_step}")
        accum = stage.batch_size // per_step
        sampler = LengthGroupedBatchSampler(
            dataset.lengths, batch_size=stage.micro_batch_size * accum, is_multimodal=dataset.is_multimodal,
            world_size=dist.world_size, rank=dist.rank, seed=seed, drop_last=True,
        )
        per_epoch = len(sampler)
        if per_epoch == 0:
            raise ValueError(
                f"stage {stage.name!r}: {len(dataset)} usable samples in dataset {stage.data!r} make no full "
                f"global batch of {stage.batch_size}; expected at least {stage.batch_size} samples"
            )
        total = stage.max_steps if stage.max_steps is not None else stage.epochs * per_epoch
        return cls(sampler=sampler, micro=stage.micro_batch_size, accum=accum, total_steps=total)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def epoch_steps(self, start: int) -> Iterator[tuple[int, int, list[list[int]]]]:
        """(epoch, first step, this rank's micro-batches of every step from there to the epoch's end),
        per epoch from the one holding ``start`` on, up to ``total_steps``."""
        spe = self.steps_per_epoch
        step = start
        while step < self.total_steps:
            epoch, offset = divmod(step, spe)
            self.sampler.set_epoch(epoch)
            batches = list(self.sampler)
            end = min(spe, offset + self.total_steps - step)
            micro = [b[k : k + self.micro] for b in batches[offset:end] for k in range(0, len(b), self.micro)]
            yield epoch, step, micro
            step += end - offset


def micro_batches(
    dataset: LlavaDataset, collator: LlavaCollator, index_lists: list[list[int]], num_workers: int
) -> Iterator[dict]:
    """Collated micro-batches in order (a DataLoader over fixed index lists)."""
    loader = DataLoader(
        dataset, batch_sampler=index_lists, collate_fn=collator, num_workers=num_workers,
        persistent_workers=False, pin_memory=False,
    )
    yield from loader
