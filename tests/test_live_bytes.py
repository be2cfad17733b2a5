"""kdengine.plan.live_bytes.TorchOps: live bytes on meta, including a storage address that is reused."""

import torch

from kdengine.plan.live_bytes import TorchOps


def test_live_and_peak_follow_allocations():
    with TorchOps() as mode:
        a = torch.empty(1000, device="meta")
        b = torch.empty(500, dtype=torch.float16, device="meta")
        assert mode.live == 4000 + 1000
        v = a[10:]  # a view keeps its base alive
        del a
        assert mode.live == 5000
        del v, b
        assert mode.live == 0
    assert mode.peak == 5000


def test_a_reused_storage_address_gets_its_own_bytes():
    """A storage freed between two ops leaves its entry until the next prune; a new, smaller storage at
    the same address (malloc reuses freed addresses) must be keyed afresh, not carry the old byte count.
    The allocator's reuse is not deterministic, so the books are set up as they were when it happened."""
    mode = TorchOps()
    dead = torch.empty(1 << 20, device="meta")
    stale = torch._C._WeakTensorRef(dead)
    del dead
    assert stale.expired()
    small = torch.empty(16, device="meta")
    key = small.untyped_storage()._cdata
    mode._storages[key] = [4 << 20, [stale]]  # the freed 4 MB storage's entry, at the address `small` now has
    mode._track(small, new=True)
    assert mode.live == 64, f"a new 64-byte tensor at a reused address counted {mode.live} bytes"
    del small
    assert mode.live == 0
