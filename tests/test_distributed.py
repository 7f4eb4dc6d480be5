"""common/distributed.py: gather_with_grad gathers the global batch and sums each row's gradient over processes;
GlobalBatchNorm equals BatchNorm on the concatenated global batch (forward, backward, running
statistics) on 2 gloo processes, with no op that would synchronise a CUDA device; one process and eval mode are the
usual BatchNorm; global_batchnorm converts a network in place. Shuffle BN: SplitBatchNorm normalises each group of
the batch alone, shuffle_bn encodes the groups of a permutation and puts the outputs back in order."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from accelerate import Accelerator

import common
from conftest import two_process_results
from sync_detector import SyncDetector


def _inputs():
    g = torch.Generator().manual_seed(3)
    # a large mean against the spread: the case where E[x^2] - E[x]^2 in float32 would lose the variance
    x = 50 + torch.randn(8, 3, 5, 5, generator=g)
    return x, torch.randn(8, 3, 5, 5, generator=g)


def ddp_case(accelerator):
    """tests/ddp_step.py: this process's rows of a global batch of 8 through GlobalBatchNorm2d(3) in train mode, twice
    (the second pass normalises around the updated running mean); the loss is a SUM over rows, so the gradients of
    the processes add up to the single process's. Then gather_with_grad of the rows and a SUM loss over the whole
    gathered batch, which every process computes."""
    x, w = _inputs()
    r, n = accelerator.process_index, accelerator.num_processes
    rows = slice(r * 8 // n, (r + 1) * 8 // n)
    bn = common.GlobalBatchNorm(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    xs = x[rows].clone().requires_grad_(True)
    gs = x[rows, :, 0, 0].clone().requires_grad_(True)  # (rows, 3) for gather_with_grad
    with SyncDetector() as syncs:
        bn(xs)
        y = bn(xs)
        (y * w[rows]).sum().backward()
        gathered = common.gather_with_grad(gs)  # (8, 3) on every process
        (gathered * w[:, :, 0, 0]).sum().backward()
    return {"y": y.detach(), "x_grad": xs.grad, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var, "syncs": syncs.ops,
            "gathered": gathered.detach(), "gathered_grad": gs.grad}


def test_two_processes_equal_one_batchnorm_on_the_global_batch(tmp_path):
    one, ranks = two_process_results("distributed", tmp_path)
    x, w = _inputs()
    ref = nn.BatchNorm2d(3)  # the definition: BatchNorm on all 8 rows in one process
    ref.load_state_dict({k: v for k, v in common.GlobalBatchNorm(3).state_dict().items()})
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        ref.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    xr = x.clone().requires_grad_(True)
    ref(xr)
    y = ref(xr)
    (y * w).sum().backward()
    two = {"y": torch.cat([r["y"] for r in ranks]), "x_grad": torch.cat([r["x_grad"] for r in ranks]),
           "weight_grad": sum(r["weight_grad"] for r in ranks), "bias_grad": sum(r["bias_grad"] for r in ranks),
           "running_mean": ranks[0]["running_mean"], "running_var": ranks[1]["running_var"]}
    for got in (one, two):
        torch.testing.assert_close(got["y"], y, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got["x_grad"], xr.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got["weight_grad"], ref.weight.grad, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(got["bias_grad"], ref.bias.grad, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(got["running_mean"], ref.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["running_var"], ref.running_var, atol=1e-5, rtol=1e-5)
    assert ranks[0]["syncs"] == [] and ranks[1]["syncs"] == []  # the distributed path: no host read, no mask
    # gather_with_grad: the global batch on every process; each row's gradient summed over the 2 processes' losses
    for got in (one, *ranks):
        torch.testing.assert_close(got["gathered"], x[:, :, 0, 0])
    torch.testing.assert_close(one["gathered_grad"], w[:, :, 0, 0])
    torch.testing.assert_close(torch.cat([r["gathered_grad"] for r in ranks]), 2 * w[:, :, 0, 0])


def test_one_process_and_eval_mode_are_the_usual_batchnorm():
    x, _ = _inputs()
    bn, ref = common.GlobalBatchNorm(3), nn.BatchNorm2d(3)
    torch.testing.assert_close(bn(x), ref(x))
    bn.eval(), ref.eval()
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)
    h = torch.randn(6, 4)
    torch.testing.assert_close(common.GlobalBatchNorm(4)(h), nn.BatchNorm1d(4)(h))  # the heads' BatchNorm1d


def test_global_batchnorm_converts_every_layer_and_keeps_the_state():
    net = torchvision.models.resnet18(weights=None)
    net.layer1[0].bn1.running_mean.fill_(0.5)
    names = [n for n, _ in net.named_parameters()]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    common.global_batchnorm(net)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 20 and all(isinstance(m, common.GlobalBatchNorm) for m in bns)
    assert [n for n, _ in net.named_parameters()] == names
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ----------------------------------------------------------------------------- shuffle BN

@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 2, 2)])
def test_split_batchnorm_normalises_each_chunk_alone(shape):
    x = torch.randn(*shape) * 3 + 1
    bn = nn.BatchNorm2d(3) if len(shape) == 4 else nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    split = common.to_split_bn(nn.Sequential(copy.deepcopy(bn)), 2)[0]
    assert isinstance(split, common.SplitBatchNorm) and split.num_splits == 2
    # by hand: each half with its own mean and biased variance over the batch and spatial dims
    dims = [0] + list(range(2, len(shape)))
    expect = []
    for h in x.chunk(2):
        mu, var = h.mean(dims, keepdim=True), h.var(dims, unbiased=False, keepdim=True)
        w, b = (t.view(1, 3, *[1] * (len(shape) - 2)) for t in (bn.weight, bn.bias))
        expect.append((h - mu) / torch.sqrt(var + bn.eps) * w + b)
    assert torch.allclose(split(x), torch.cat(expect), atol=1e-5)
    split.num_splits = 1
    assert torch.allclose(split(x), bn(x), atol=1e-5)  # one group = plain BN
    assert torch.equal(split.running_mean, torch.zeros(3))  # not moved: the EMA update copies the trained network's
    split.load_state_dict(bn.state_dict())
    split.eval(), bn.eval()
    assert torch.allclose(split(x), bn(x), atol=1e-6)  # eval: running statistics


def test_shuffle_bn_encodes_groups_of_the_shuffled_batch():
    """One process, 2 BN groups: the output equals encoding each half of the permutation on its own."""
    teacher = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    split = common.to_split_bn(copy.deepcopy(teacher), 2)
    x = torch.randn(8, 3)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    z = common.shuffle_bn(split, x, perm, Accelerator(cpu=True))
    expect = torch.empty(8, 2)
    with torch.no_grad():
        for idx in perm.chunk(2):
            expect[idx] = teacher(x[idx])
    assert torch.allclose(z, expect, atol=1e-5)
    assert not torch.allclose(z, teacher(x).detach(), atol=1e-3)  # differs from global BN
