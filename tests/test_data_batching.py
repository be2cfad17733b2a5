"""Collator padding and batch contract, image processing, length-grouped sampler."""

import random

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, SiglipImageProcessorPil

from kdengine.data.collator import LlavaCollator
from kdengine.data.dataset import build_dataset
from kdengine.data.images import expand_to_square, process_images
from kdengine.data.sampler import LengthGroupedBatchSampler
from kdengine.data.synth import synthesize

PAD, IMG = 0, 3
BATCH_KEYS = {"input_ids", "attention_mask", "labels", "visual_mask", "pixel_values", "ids", "skipped"}


def sample(sid, ids, labels, n_images=0, fill=0.0):
    pv = torch.full((n_images, 3, 4, 4), fill) + torch.arange(n_images).view(-1, 1, 1, 1) if n_images else None
    return {"id": sid, "input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pv}


def test_collator_pads_right_and_keeps_masks():
    collate = LlavaCollator(pad_token_id=PAD, image_token_id=IMG, num_image_tokens=2)
    batch = collate(
        [
            sample("a", [3, 3, 7, 8, 9], [-100, -100, -100, 8, 9], n_images=1, fill=10.0),
            sample("b", [5, 6, 1], [-100, 6, 1]),
            sample("c", [3, 3, 3, 3, 4, 1], [-100, -100, -100, -100, 4, 1], n_images=2, fill=20.0),
        ]
    )
    assert set(batch) == BATCH_KEYS
    assert batch["input_ids"].tolist() == [[3, 3, 7, 8, 9, 0], [5, 6, 1, 0, 0, 0], [3, 3, 3, 3, 4, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [
        [-100, -100, -100, 8, 9, -100],
        [-100, 6, 1, -100, -100, -100],
        [-100, -100, -100, -100, 4, 1],
    ]
    assert batch["visual_mask"].tolist() == [
        [True, True, False, False, False, False],
        [False] * 6,
        [True, True, True, True, False, False],
    ]
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].dtype == torch.long
    assert batch["visual_mask"].dtype == torch.bool
    # images of the batch in sample order: a's one image, then c's two
    pv = batch["pixel_values"]
    assert pv.shape == (3, 3, 4, 4) and pv.dtype == torch.float32
    assert pv[:, 0, 0, 0].tolist() == [10.0, 20.0, 21.0]
    assert batch["ids"] == ["a", "b", "c"]


def test_collator_text_only_and_multiple_of():
    collate = LlavaCollator(PAD, IMG, 2, pad_to_multiple_of=4)
    batch = collate([sample("t", [5, 6, 1, 2, 2], [-100, 6, 1, 2, 2])])
    assert batch["pixel_values"] is None
    assert batch["input_ids"].tolist() == [[5, 6, 1, 2, 2, 0, 0, 0]]
    assert not batch["visual_mask"].any()


def test_collator_rejects_image_tokens_that_do_not_match_images():
    collate = LlavaCollator(PAD, IMG, num_image_tokens=2)
    with pytest.raises(ValueError, match=r"sample 'x': 3 image tokens for 1 image\(s\): expected 1 \* 2 = 2"):
        collate([sample("x", [3, 3, 3, 5], [-100, -100, -100, 5], n_images=1)])
    with pytest.raises(ValueError, match="pad_token_id == image_token_id == 3"):
        LlavaCollator(3, 3, 2)


def test_expand_to_square_centres_on_background():
    img = Image.new("RGB", (4, 2), (200, 0, 0))
    sq = expand_to_square(img, (10, 20, 30))
    assert sq.size == (4, 4)
    rows = [[sq.getpixel((x, y)) for x in range(4)] for y in range(4)]
    assert rows[0] == rows[3] == [(10, 20, 30)] * 4
    assert rows[1] == rows[2] == [(200, 0, 0)] * 4
    tall = expand_to_square(Image.new("RGB", (1, 3), (0, 0, 0)), (9, 9, 9))
    assert [tall.getpixel((x, 1)) for x in range(3)] == [(9, 9, 9), (0, 0, 0), (9, 9, 9)]


def test_process_images_pad_to_square_uses_processor_mean():
    proc = SiglipImageProcessorPil(size={"height": 32, "width": 32})  # mean 0.5, std 0.5
    wide = Image.new("RGB", (40, 20), (255, 255, 255))
    pv = process_images([wide, wide], proc, pad_to_square=True)
    assert pv.shape == (2, 3, 32, 32) and pv.dtype == torch.float32
    # padding colour round(0.5 * 255) = 128 normalises to about 0; the white band to 1
    torch.testing.assert_close(pv[0, :, 2, 16], torch.full((3,), (128 / 255 - 0.5) / 0.5))
    torch.testing.assert_close(pv[0, :, 16, 16], torch.ones(3))
    plain = process_images([wide], proc, pad_to_square=False)
    torch.testing.assert_close(plain[0, :, 2, 16], torch.ones(3))


def make_lengths(n=203, seed=0):
    rng = random.Random(seed)
    lengths = [rng.randint(5, 300) for _ in range(n)]
    mm = [rng.random() < 0.6 for _ in range(n)]
    return lengths, mm


def test_sampler_deterministic_by_seed_and_epoch():
    lengths, mm = make_lengths()
    a = list(LengthGroupedBatchSampler(lengths, 4, mm, seed=3))
    b = list(LengthGroupedBatchSampler(lengths, 4, mm, seed=3))
    assert a == b
    assert a != list(LengthGroupedBatchSampler(lengths, 4, mm, seed=4))
    s = LengthGroupedBatchSampler(lengths, 4, mm, seed=3)
    s.set_epoch(1)
    assert list(s) != a


def test_sampler_groups_by_modality_and_length():
    lengths, mm = make_lengths()
    s = LengthGroupedBatchSampler(lengths, 4, mm, seed=0, mega_batch=8)
    batches = list(s)
    assert len(batches) == len(s) == 51  # ceil(203 / 4)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(203))  # every sample exactly once
    mixed = [b for b in batches if len({mm[i] for i in b}) > 1]
    assert len(mixed) <= 1
    assert sum(len(b) < 4 for b in batches) == 1  # one short batch on a single rank

    def padded_tokens(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    rng = random.Random(0)
    perm = list(range(203))
    rng.shuffle(perm)
    random_batches = [perm[k : k + 4] for k in range(0, 203, 4)]
    assert padded_tokens(batches) < 0.8 * padded_tokens(random_batches)


def test_sampler_ranks_step_together():
    lengths, mm = make_lengths()
    ranks = [list(LengthGroupedBatchSampler(lengths, 4, mm, world_size=3, rank=r, seed=1)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 == len({len(b) for r in ranks for b in r})  # all batches of 4
    assert len(ranks[0]) == len(LengthGroupedBatchSampler(lengths, 4, mm, world_size=3, rank=0)) == 17  # ceil(203/12)
    seen = [i for r in ranks for b in r for i in b]
    assert set(seen) == set(range(203)) and len(seen) == 17 * 12  # 1 filler sample repeated
    for step in zip(*ranks):  # one step across ranks: disjoint
        assert len({i for b in step for i in b}) == 12
    dropped = [list(LengthGroupedBatchSampler(lengths, 4, mm, world_size=3, rank=r, drop_last=True)) for r in range(3)]
    assert [len(r) for r in dropped] == [16, 16, 16]


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        LengthGroupedBatchSampler([1, 2], 1, world_size=2, rank=2)
    with pytest.raises(ValueError, match="is_multimodal has 1 entries, lengths 2"):
        LengthGroupedBatchSampler([1, 2], 1, [True])


def test_dataloader_end_to_end_on_synth(tmp_path):
    paths = synthesize(tmp_path / "s", seed=0, n_caption=12, n_instruct=30, n_eval=2, image_size=32, text_only=0.2)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    proc = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ds = build_dataset(
        paths["instruct"], tok, proc, image_folder=paths["images"], template="chat", num_image_tokens=16, verbose=False
    )
    assert 0 < sum(not m for m in ds.is_multimodal) < len(ds)
    collate = LlavaCollator(tok.pad_token_id, ds.image_token_id, 16)
    loader = DataLoader(ds, batch_sampler=LengthGroupedBatchSampler(ds.lengths, 4, ds.is_multimodal), collate_fn=collate)
    has_image = {r.id: r.has_image for r in ds.records}
    seen = []
    for batch in loader:
        assert set(batch) == BATCH_KEYS
        n_img = sum(has_image[i] for i in batch["ids"])
        if n_img:
            assert batch["pixel_values"].shape == (n_img, 3, 32, 32)
        else:
            assert batch["pixel_values"] is None
        assert torch.equal(batch["visual_mask"], batch["input_ids"] == ds.image_token_id)
        assert int(batch["visual_mask"].sum()) == 16 * n_img
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
        lab = batch["labels"]
        assert torch.equal(lab[lab != -100], batch["input_ids"][lab != -100])
        seen += batch["ids"]
    assert sorted(seen) == sorted(r.id for r in ds.records)
