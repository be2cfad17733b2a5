"""kdengine.cache: the teacher cache is exact (hidden), resumable, verified and read per rank.

A tiny teacher (64 hidden) and student (32 hidden) on 24 synthetic instruct samples. The online
loss (teacher forward every step) is the reference: a hidden cache must give the same per-step
losses and parameters (1e-6 relative); a top-k cache with k = V the same loss up to fp32 rounding.
"""

import json
import os

import pytest
import torch

from kdengine.cache import (
    CacheError,
    CacheSettings,
    CachedCollator,
    CachedTeacher,
    IndexedDataset,
    TeacherCacheReader,
    gram_cosine_from_teacher_gram,
    import_topk_jsonl,
    load_manifest,
    topk_kd_loss,
    write_teacher_cache,
)
from kdengine.cache import writer as writer_mod
from kdengine.cache.format import pack_gram, unpack_gram
from kdengine.cache.manifest import fingerprint
from kdengine.cache.reader import stage_positions
from kdengine.data import LengthGroupedBatchSampler, LlavaCollator, build_dataset, synthesize
from kdengine.losses import DistillSettings, LossWeights, gram_cosine_loss, llava_kd_loss
from kdengine.model import ModelSpec, TinySpec, build_model, distill_forward, num_image_tokens, set_trainable

VISION = dict(image_size=16, patch_size=8, vision_hidden=16, vision_layers=1, vision_heads=2,
              vision_intermediate=32, max_positions=256, vision_seed=0)
TEXT = dict(text_heads=4, text_kv_heads=2)
TEACHER = TinySpec(**VISION, **TEXT, text_hidden=64, text_layers=2, text_intermediate=128, seed=2)
STUDENT = TinySpec(**VISION, **TEXT, text_hidden=32, text_layers=1, text_intermediate=64, seed=1)
SETTINGS = DistillSettings(impl="torch")
WEIGHTS = LossWeights()  # ce 1, res 1, vis 1, rel 0.5: every term


class Tiny:
    """The shared world of these tests: data, models, dataset, collator, fingerprint."""

    def __init__(self, root):
        self.data = os.path.join(root, "data")
        synthesize(self.data, seed=0, n_caption=4, n_instruct=24, n_eval=1, image_size=32, vocab_size=600)
        tok = os.path.join(self.data, "tokenizer")
        self.teacher, self.processor = build_model(ModelSpec(source="tiny", tokenizer=tok, tiny=TEACHER))
        self.teacher.eval().requires_grad_(False)
        self.p = num_image_tokens(self.teacher)
        self.dataset = self.build_dataset()
        self.collator = LlavaCollator(self.processor.tokenizer.pad_token_id, self.teacher.config.image_token_id,
                                      self.p)
        self.fp = fingerprint({"name": "tiny-teacher", "seed": 2}, self.path, "chat", None, self.processor)

    @property
    def path(self):
        return os.path.join(self.data, "instruct.json")

    def build_dataset(self, **kw):
        kw = {"template": "chat", "max_length": None, **kw}
        return build_dataset(self.path, self.processor.tokenizer, self.processor.image_processor,
                             image_folder=os.path.join(self.data, "images"), num_image_tokens=self.p,
                             verbose=False, **kw)

    def student(self):
        tok = os.path.join(self.data, "tokenizer")
        model, _ = build_model(ModelSpec(source="tiny", tokenizer=tok, tiny=STUDENT))
        set_trainable(model, ["projector", "language_model"])
        return model.train()

    def write(self, directory, **settings):
        settings = {"shard_samples": 5, "batch_size": 4, **settings}
        return write_teacher_cache(self.teacher, self.dataset, self.collator, str(directory),
                                   CacheSettings(**settings), self.fp, log=lambda *_: None)

    def batches(self, reader=None, batch_size=4, world_size=1, rank=0):
        """Length-grouped batches of this rank (with ``reader``: carrying the cached teacher rows)."""
        sampler = LengthGroupedBatchSampler(self.dataset.lengths, batch_size=batch_size,
                                            is_multimodal=self.dataset.is_multimodal, world_size=world_size,
                                            rank=rank, seed=0, drop_last=True)
        data = self.dataset if reader is None else IndexedDataset(self.dataset)
        collate = self.collator if reader is None else CachedCollator(self.collator, reader)
        return [collate([data[i] for i in idx]) for idx in sampler], list(sampler)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tiny(str(tmp_path_factory.mktemp("cache_world")))


@pytest.fixture(scope="module")
def hidden_cache(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("hidden")
    tiny.write(d)
    return str(d)


@pytest.fixture(scope="module")
def topk_cache(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("topk")
    tiny.write(d, mode="topk", k=4)
    return str(d)


def online_teacher(tiny, batch):
    with torch.no_grad():
        return distill_forward(tiny.teacher, batch)


def train(tiny, batches, teacher_of, loss_fn=llava_kd_loss, steps=5):
    """``steps`` AdamW steps of a fresh student; returns (per-step losses, final parameters)."""
    torch.manual_seed(0)
    student = tiny.student()
    opt = torch.optim.AdamW([q for q in student.parameters() if q.requires_grad], lr=1e-3)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss, _ = loss_fn(distill_forward(student, batch), teacher_of(batch), WEIGHTS, SETTINGS, tiny.p)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach().double()))
    return losses, {k: v.detach().clone() for k, v in student.named_parameters()}


# ----------------------------------------------------------------------------- exactness


def test_hidden_cache_training_equals_online(tiny, hidden_cache):
    """5 steps from the hidden cache: same losses (1e-6 relative) and parameters as the online teacher."""
    reader = TeacherCacheReader(hidden_cache)
    cached = CachedTeacher(reader)
    batches, _ = tiny.batches(reader)
    assert len(batches) >= 5
    ref_losses, ref_params = train(tiny, batches, lambda b: online_teacher(tiny, b))
    got_losses, got_params = train(tiny, batches, cached.outputs)
    for step, (a, b) in enumerate(zip(got_losses, ref_losses)):
        assert abs(a - b) <= 1e-6 * abs(b), f"step {step}: cached loss {a!r} vs online {b!r}"
    for name, ref in ref_params.items():
        torch.testing.assert_close(got_params[name], ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert ref_losses[0] != ref_losses[-1]  # the student did train


def test_hidden_cache_holds_the_teachers_rows(tiny, hidden_cache):
    """Cached rows are the teacher's states at response + visual positions, its lm_head and W^T W."""
    reader = TeacherCacheReader(hidden_cache)
    m = reader.manifest
    assert m.complete and m.mode == "hidden" and m.dtype == "float32" and len(m.shards) == 5  # 24 samples / 5
    batch = tiny.collator([tiny.dataset[i] for i in (3, 7)])
    out = online_teacher(tiny, batch)
    for b, i in enumerate((3, 7)):
        t = reader.sample(i, batch["ids"][b])
        rows = (out.response_mask[b] | out.visual_mask[b]).nonzero().flatten()
        assert t["positions"].tolist() == rows.tolist()
        torch.testing.assert_close(t["hidden"], out.hidden[b, rows], rtol=1e-6, atol=1e-6)
    w, g = reader.head()
    w0 = tiny.teacher.get_output_embeddings().weight
    assert torch.equal(w, w0)
    torch.testing.assert_close(g.double(), w0.double().T @ w0.double(), rtol=1e-5, atol=1e-5)


def test_topk_cache_with_k_equal_v_gives_the_online_loss(tiny, tmp_path):
    """k = V top-k (fp32) is the full teacher distribution: the objective equals the online one."""
    v = tiny.teacher.get_output_embeddings().weight.shape[0]
    tiny.write(tmp_path, mode="topk", k=v, dtype="float32")
    cached = CachedTeacher(TeacherCacheReader(str(tmp_path)))
    batches, _ = tiny.batches(cached.reader)
    ref_losses, _ = train(tiny, batches, lambda b: online_teacher(tiny, b), steps=2)
    got_losses, _ = train(tiny, batches, cached.outputs, loss_fn=topk_kd_loss, steps=2)
    for a, b in zip(got_losses, ref_losses):
        assert abs(a - b) <= 2e-5 * abs(b), (got_losses, ref_losses)


@pytest.mark.parametrize("reduction", ["batch", "sample"])
def test_rdist_from_stored_gram_equals_gram_cosine_loss(reduction):
    """R_t stored (packed upper triangle) -> same loss and student gradients as gram_cosine_loss."""
    g = torch.Generator().manual_seed(0)
    n, p, ds, dt, v = 3, 7, 12, 20, 37
    hs = torch.randn(n, p, ds, generator=g, requires_grad=True)
    ws = torch.randn(v, ds, generator=g, requires_grad=True)
    ht, wt = torch.randn(n, p, dt, generator=g), torch.randn(v + 5, dt, generator=g)
    zt = (ht.double() @ wt[:v].double().T)
    rt = unpack_gram(pack_gram(zt @ zt.transpose(1, 2)).float(), p)
    got = gram_cosine_from_teacher_gram(hs, ws, rt, vocab_rows=v, reduction=reduction)
    ref = gram_cosine_loss(hs.double(), ws.double(), ht.double(), wt.double(), reduction=reduction,
                           impl="reference")
    a, b = float(got.detach()), float(ref.detach())
    assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (a, b)
    gh, gw = torch.autograd.grad(got, (hs, ws))
    rh, rw = torch.autograd.grad(ref, (hs, ws))  # float64 math, gradients cast back to the fp32 leaves
    scale = max(float(rh.abs().max()), float(rw.abs().max()))
    torch.testing.assert_close(gh, rh, rtol=1e-3, atol=1e-5 * scale)
    torch.testing.assert_close(gw, rw, rtol=1e-3, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- storage


def test_killed_run_resumes_from_its_last_complete_shard(tiny, hidden_cache, tmp_path, monkeypatch):
    real, calls = writer_mod.write_tensors, []

    def dies_on_third_shard(directory, name, tensors):
        calls.append(name)
        if name.startswith("shard-") and sum(c.startswith("shard-") for c in calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(directory, name, tensors)

    monkeypatch.setattr(writer_mod, "write_tensors", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        tiny.write(tmp_path)
    m = load_manifest(str(tmp_path))
    assert not m.complete and len(m.shards) == 2 and len(m.pending()) == 24 - 10
    with pytest.raises(CacheError, match="incomplete: 10 of 24"):
        TeacherCacheReader(str(tmp_path))
    first = {sh["file"]: os.stat(os.path.join(tmp_path, sh["file"])).st_mtime_ns for sh in m.shards}
    monkeypatch.setattr(writer_mod, "write_tensors", real)
    tiny.write(tmp_path)  # resumes
    done, fresh = TeacherCacheReader(str(tmp_path)), TeacherCacheReader(hidden_cache)
    assert {f: os.stat(os.path.join(tmp_path, f)).st_mtime_ns for f in first} == first  # not rewritten
    for i in range(24):  # other teacher batches after the resume: equal up to fp32 rounding of the padding
        a, b = done.sample(i), fresh.sample(i)
        assert torch.equal(a["positions"], b["positions"]), i
        torch.testing.assert_close(a["hidden"], b["hidden"], rtol=1e-5, atol=1e-5)


def test_refuses_when_the_disk_lacks_room(tiny, tmp_path, monkeypatch):
    class Usage:
        free = 1000

    monkeypatch.setattr("kdengine.cache.format.shutil.disk_usage", lambda path: Usage)
    with pytest.raises(CacheError, match=r"not enough disk for the teacher cache \(24 samples\).*1,000 bytes"):
        tiny.write(tmp_path, mode="topk", k=4)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("shard-")]


def test_prints_the_estimated_size(tiny, tmp_path):
    lines = []
    write_teacher_cache(tiny.teacher, tiny.dataset, tiny.collator, str(tmp_path), CacheSettings(mode="topk", k=4),
                        tiny.fp, log=lines.append)
    m = load_manifest(str(tmp_path))
    written = sum(sh["bytes"] for sh in m.shards)
    est = lines[0]
    assert "bytes/sample x 24 samples" in est, est
    need = int(est.split("= ")[1].split(" bytes")[0].replace(",", ""))
    assert 0.5 * written <= need <= 1.5 * written, (est, written)  # tensor data vs files with headers


def test_corrupted_or_truncated_shard_fails_before_any_step(hidden_cache, tmp_path):
    import shutil

    for damage in ("flip", "truncate"):
        d = tmp_path / damage
        shutil.copytree(hidden_cache, d)
        path = d / "shard-00002.safetensors"
        data = bytearray(path.read_bytes())
        if damage == "flip":
            data[-10] ^= 0xFF
        else:
            data = data[: len(data) // 2]
        path.write_bytes(bytes(data))
        with pytest.raises(CacheError, match="shard-00002.safetensors" + (" is corrupted" if damage == "flip"
                                                                          else " has .* bytes")):
            TeacherCacheReader(str(d))


def test_ranks_read_only_their_own_samples(tiny, hidden_cache):
    """Two ranks of the length-grouped sampler: each reads exactly its samples, together all of them."""
    seen = []
    for rank in (0, 1):
        reader = TeacherCacheReader(hidden_cache)
        read = []
        real = reader.sample
        reader.sample = lambda i, sid=None, real=real, read=read: read.append(i) or real(i, sid)
        batches, idx = tiny.batches(reader, batch_size=2, world_size=2, rank=rank)
        mine = [i for b in idx for i in b]
        assert sorted(read) == sorted(mine) and reader.reads == len(mine)
        for batch in batches:
            assert batch["teacher_cache"].hidden.shape[:2] == batch["input_ids"].shape
        seen.append(set(mine))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field,change", [
    ("teacher", {"teacher": {"name": "another-teacher"}}),
    ("dataset", {"dataset": {"files": {"instruct.json": [1, "0" * 64]}}}),
    ("max_length", {"max_length": 64}),
    ("template", {"template": "vicuna"}),
    ("tokenizer", {"tokenizer": "f" * 64}),
    ("temperature", {"temperature": 2.0}),
])
def test_a_cache_for_another_stage_names_the_field(tiny, topk_cache, field, change):
    reader = TeacherCacheReader(topk_cache)
    reader.check({**tiny.fp, "temperature": 1.0, "mode": "topk"})  # the stage it was written for passes
    with pytest.raises(CacheError, match=f"does not match the stage: {field} differs"):
        reader.check({**tiny.fp, "temperature": 1.0, **change})


def test_missing_sample_and_other_tokenization_are_named(tiny, hidden_cache):
    reader = TeacherCacheReader(hidden_cache)
    with pytest.raises(CacheError, match=r"sample 'ins-999' \(index 24\) is missing"):
        reader.sample(24, "ins-999")
    with pytest.raises(CacheError, match=r"sample 'other' \(index 0\) is missing"):
        reader.sample(0, "other")
    assert torch.equal(reader.sample(0, "ins-000005")["positions"], reader.sample(5)["positions"])  # found by id
    s = {**tiny.dataset[4], "cache_index": 4}  # as another template would mask it: one label less
    s["labels"] = s["labels"].clone()
    s["labels"][int((s["labels"] != -100).nonzero()[0])] = -100
    with pytest.raises(CacheError, match=f"sample '{s['id']}' .* first difference"):
        CachedCollator(tiny.collator, reader)([s])


def test_topk_cache_refuses_what_it_cannot_give(tiny, topk_cache):
    import dataclasses
    import pickle

    cached = CachedTeacher(TeacherCacheReader(topk_cache))
    v = tiny.teacher.get_output_embeddings().weight.shape[0]
    with pytest.raises(CacheError, match=f"{v} vocabulary rows but the student has {v + 1}"):
        cached.check_student(v + 1)
    cached.check_student(v)
    collate = pickle.loads(pickle.dumps(CachedCollator(tiny.collator, cached.reader)))  # a DataLoader worker's copy
    batch = collate([IndexedDataset(tiny.dataset)[i] for i in (0, 1)])
    student = distill_forward(tiny.student(), batch)
    targets = cached.outputs(batch)
    for settings, message in ((DistillSettings(divergence="reverse_kl"), "forward_kl only"),
                              (DistillSettings(temperature=2.0), "at temperature 1.0")):
        with pytest.raises(CacheError, match=message):
            topk_kd_loss(student, targets, WEIGHTS, settings, tiny.p)
    no_vis = dataclasses.replace(targets, mask=targets.mask & ~batch["visual_mask"], rows="response")
    with pytest.raises(CacheError, match="expected weights.vis = 0"):
        topk_kd_loss(student, no_vis, WEIGHTS, SETTINGS, tiny.p)
    with pytest.raises(CacheError, match="no teacher Gram"):
        topk_kd_loss(student, dataclasses.replace(targets, gram=None), WEIGHTS, SETTINGS, tiny.p)


# ----------------------------------------------------------------------------- import


def server_records(teacher, dataset, collator, k, rows="response"):
    """What an inference server would return: per response position the top-k of the teacher."""
    recs = []
    for i in range(len(dataset)):
        batch = collator([dataset[i]])
        with torch.no_grad():
            out = distill_forward(teacher, batch)
        pos = stage_positions(batch, 0, rows)
        lp = torch.log_softmax(out.hidden[0, pos.long()] @ out.lm_head_weight.T, -1).topk(k)
        recs.append({"id": batch["ids"][0], "positions": pos.tolist(), "top_ids": lp.indices.tolist(),
                     "top_logprobs": lp.values.tolist()})
    return recs


def write_jsonl(path, recs):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return str(path)


@pytest.fixture(scope="module")
def records(tiny):
    return server_records(tiny.teacher, tiny.dataset, tiny.collator, k=3)


def do_import(tiny, recs, tmp_path, name="in.jsonl"):
    v = tiny.teacher.get_output_embeddings().weight.shape[0]
    fp = {**tiny.fp, "teacher": {"external": "server"}, "num_image_tokens": tiny.p}
    return import_topk_jsonl(write_jsonl(tmp_path / name, recs), tiny.dataset, str(tmp_path / (name + ".cache")), k=3,
                             temperature=1.0, fingerprint=fp, vocab_rows=v, shard_samples=10, log=lambda *_: None)


def test_import_round_trip(tiny, records, tmp_path):
    recs = records[::-1]  # any order
    recs[0] = {**recs[0], "top_ids": [r[:2] for r in recs[0]["top_ids"]],
               "top_logprobs": [r[:2] for r in recs[0]["top_logprobs"]]}  # fewer than k: padded
    m = do_import(tiny, recs, tmp_path)
    assert m.complete and m.rows == "response" and not m.has_gram and len(m.shards) == 3
    reader = TeacherCacheReader(str(tmp_path / "in.jsonl.cache"))
    i = [r.id for r in tiny.dataset.records].index(recs[1]["id"])
    t = reader.sample(i, recs[1]["id"])
    assert t["positions"].tolist() == recs[1]["positions"] and t["ids"].tolist() == recs[1]["top_ids"]
    torch.testing.assert_close(t["logprobs"], torch.tensor(recs[1]["top_logprobs"]))
    last = reader.sample(len(tiny.dataset) - 1)
    assert (last["ids"][:, 2] == -1).all()  # padding


def _edit(rec, key, fn):
    rec = json.loads(json.dumps(rec))
    fn(rec[key])
    return rec


@pytest.mark.parametrize("what,edit,message", [
    ("unsorted", lambda r: _edit(r, "top_logprobs", lambda x: x[0].reverse()), "not sorted by log-probability"),
    ("duplicate", lambda r: _edit(r, "top_ids", lambda x: x[0].__setitem__(1, x[0][0])), "appears twice"),
    ("positive", lambda r: _edit(r, "top_logprobs", lambda x: x[0].__setitem__(0, 0.5)), "log-probability is positive"),
    ("positions", lambda r: _edit(r, "positions", lambda x: x.__setitem__(0, x[0] - 1)), "positions do not match"),
    ("rows", lambda r: _edit(r, "top_ids", lambda x: x.pop()), "rows for"),
    ("unknown id", lambda r: {**r, "id": "nope"}, "no sample with this id"),
])
def test_import_errors_name_the_record(tiny, records, tmp_path, what, edit, message):
    recs = list(records)
    recs[5] = edit(recs[5])
    with pytest.raises(CacheError, match=rf"in.jsonl:6 \(id '{recs[5]['id']}'\).*{message}"):
        do_import(tiny, recs, tmp_path)


def test_import_repeated_or_missing_sample(tiny, records, tmp_path):
    with pytest.raises(CacheError, match="in.jsonl:3 .* appears twice"):
        do_import(tiny, [records[0], records[1], records[0]], tmp_path)
    with pytest.raises(CacheError, match=f"23 of 24 dataset samples have no record"):
        do_import(tiny, records[:1], tmp_path, name="short.jsonl")
