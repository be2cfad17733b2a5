"""Feature projector: the three kinds, bit-exact save/load round trip, atomic files, bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from kdengine.model.feature_projector import (PROJECTOR_FILE, PROJECTOR_SPEC_FILE, IdentityProjector,
                                              build_feature_projector, load_feature_projector,
                                              save_feature_projector)


def test_kinds_have_the_documented_layers():
    lin = build_feature_projector("linear", 6, 10)
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (10, 6) and lin.bias.shape == (10,)
    mlp = build_feature_projector("mlp", 6, 10)
    assert [type(m) for m in mlp] == [nn.Linear, nn.GELU, nn.Linear]
    assert mlp[0].weight.shape == (10, 6) and mlp[2].weight.shape == (10, 10)  # hidden width Dt
    x = torch.randn(4, 6)
    assert torch.equal(mlp(x), mlp[2](torch.nn.functional.gelu(mlp[0](x))))
    none = build_feature_projector("none", 8, 8)
    assert isinstance(none, IdentityProjector) and not list(none.parameters())
    y = torch.randn(3, 8)
    assert none(y) is y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind,ds,dt", [("linear", 6, 10), ("mlp", 6, 10), ("none", 8, 8)])
def test_save_load_round_trip_is_bit_exact(tmp_path, kind, ds, dt, dtype):
    torch.manual_seed(0)
    module = build_feature_projector(kind, ds, dt).to(dtype)
    with torch.no_grad():  # weights that differ from a fresh init
        for p in module.parameters():
            p.add_(torch.randn_like(p))
    path = save_feature_projector(module, str(tmp_path))
    assert path == os.path.join(str(tmp_path), PROJECTOR_FILE)
    assert sorted(os.listdir(tmp_path)) == sorted([PROJECTOR_FILE, PROJECTOR_SPEC_FILE])  # no temporary left
    with open(tmp_path / PROJECTOR_SPEC_FILE) as f:
        assert json.load(f) == {"kind": kind, "ds": ds, "dt": dt}
    loaded = load_feature_projector(str(tmp_path))
    assert type(loaded) is type(module)
    want, got = module.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    x = torch.randn(5, ds).to(dtype)
    assert torch.equal(loaded(x), module(x))


def test_save_overwrites_a_previous_projector(tmp_path):
    save_feature_projector(build_feature_projector("linear", 4, 5), str(tmp_path))
    second = build_feature_projector("mlp", 3, 7)
    save_feature_projector(second, str(tmp_path))
    loaded = load_feature_projector(str(tmp_path))
    assert isinstance(loaded, nn.Sequential) and torch.equal(loaded[2].weight, second[2].weight)


@pytest.mark.parametrize("args,match", [
    (("none", 6, 10), r"kind='none' needs the student's hidden size ds=6 to equal the teacher's dt=10"),
    (("conv", 6, 10), r"kind='conv'; expected one of \('linear', 'mlp', 'none'\)"),
    (("linear", 0, 10), r"ds=0; expected an int >= 1"),
    (("mlp", 6, 2.5), r"dt=2.5; expected an int >= 1"),
    (("linear", True, 4), r"ds=True; expected an int >= 1"),
])
def test_bad_build_raises_named_error(args, match):
    with pytest.raises(ValueError, match=match):
        build_feature_projector(*args)


def test_save_refuses_a_foreign_module(tmp_path):
    with pytest.raises(ValueError, match=r"module is a Conv1d; expected a projector from build_feature_projector"):
        save_feature_projector(nn.Conv1d(2, 3, 1), str(tmp_path))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"feature_projector.safetensors not found"):
        load_feature_projector(str(tmp_path))
    save_feature_projector(build_feature_projector("linear", 4, 5), str(tmp_path))
    spec = tmp_path / PROJECTOR_SPEC_FILE
    spec.write_text(json.dumps({"kind": "linear", "ds": 4, "dt": 6}))
    with pytest.raises(ValueError, match=r"feature_projector.safetensors does not match .*feature_projector.json"):
        load_feature_projector(str(tmp_path))
    spec.write_text(json.dumps({"kind": "linear", "ds": 4}))
    with pytest.raises(ValueError, match=r"feature_projector.json holds .*; expected"):
        load_feature_projector(str(tmp_path))
    spec.write_text(json.dumps({"kind": "mlp", "ds": 4, "dt": 5}))
    with pytest.raises(ValueError, match=r"does not match"):
        load_feature_projector(str(tmp_path))
