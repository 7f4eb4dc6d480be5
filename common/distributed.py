"""What crosses processes, each without a host synchronisation: an all-gather that keeps the autograd graph
(gather_with_grad), BatchNorm over the global batch (GlobalBatchNorm) and over groups of a shuffled global batch
(MoCo's shuffle BN: SplitBatchNorm, shuffle_bn).

torch.nn.SyncBatchNorm gathers every process's (mean, invstd, count) and then drops the entries of processes whose
batch was empty with a boolean mask (torch/nn/modules/_functions.py, https://github.com/pytorch/pytorch/issues/78549):
on CUDA that is a device-to-host sync in every BatchNorm layer of every forward, 40-90 per training step of these
scripts. Here every process holds the same number of rows (--batch-size divides evenly over the processes), so the
per-process (mean, variance) pairs combine without counts: ONE differentiable all-gather per layer and no mask.
Forward, backward and running statistics equal BatchNorm on the concatenated global batch (tests/test_distributed.py).
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.distributed import nn as dist_nn


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x):
    """All-gather (B, ...) -> (N, ...) keeping the autograd graph (accelerator.gather has none): the backward sums
    each row's gradient over processes (x world size), which DDP's gradient averaging divides out again."""
    return torch.cat(dist_nn.all_gather(x.contiguous())) if world_size() > 1 else x


# ----------------------------------------------------------------------------- global BN

class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d, 2d or 3d input) whose training statistics span the batches of all processes (equal sizes)."""

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"GlobalBatchNorm expects 2-5 dimensional input, got {x.dim()} dimensions")

    def forward(self, x):
        world = world_size()
        if not self.training or world == 1:
            return super().forward(x)  # evaluation, or one process: the usual BatchNorm
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        n = x.numel() // x.shape[1] * world
        xf = x.float()
        # each process's mean and (biased) variance, gathered in ONE differentiable collective and combined for equal
        # counts: mean = mean of means, var = mean of variances + variance of the means (no E[x^2] - E[x]^2
        # cancellation); the backward of all_gather sums each process's share of the gradient
        local_var, local_mean = torch.var_mean(xf, dim=dims, correction=0)
        stats = torch.stack(dist_nn.all_gather(torch.cat([local_mean, local_var])))  # (world, 2C)
        means, variances = stats[:, :x.shape[1]], stats[:, x.shape[1]:]
        mean = means.mean(0)
        var = variances.mean(0) + (means - mean).pow(2).mean(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var.detach() * n / max(n - 1, 1)).to(self.running_var.dtype), factor)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def global_batchnorm(module):
    """Replace every BatchNorm of `module` (plain or Sync) in place by a GlobalBatchNorm with the same state and at
    the same position (parameter order unchanged, for the EMA copies); returns the module."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        bn = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        state = module.state_dict()
        bn.load_state_dict(state)
        return bn.to(next(iter(state.values())).device) if state else bn
    for name, child in module.named_children():
        setattr(module, name, global_batchnorm(child))
    return module


# ----------------------------------------------------------------------------- shuffle BN

class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d or 2d) whose train-mode statistics come from `num_splits` contiguous chunks of the batch: the BN
    groups of MoCo's shuffle BN (https://arxiv.org/abs/1911.05722, Sec. 3.3), for a momentum encoder. Train mode
    leaves the running statistics alone (the EMA update copies them from the trained network); eval mode uses them."""

    num_splits = 1

    def forward(self, x):
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        g = self.num_splits
        # the chunks side by side as channels: one batch_norm call normalises each chunk with its own statistics
        y = F.batch_norm(rearrange(x, "(g n) c ... -> n (g c) ...", g=g), None, None,
                         self.weight.repeat(g), self.bias.repeat(g), True, 0.0, self.eps)
        return rearrange(y, "n (g c) ... -> (g n) c ...", g=g)


def to_split_bn(module, num_splits):
    """Replace every BatchNorm (plain or Sync) of `module` in place by a SplitBatchNorm with the same state and at the
    same position (parameter order unchanged, for the EMA); returns the module."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            bn = SplitBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats).to(child.weight.device)
            bn.load_state_dict(child.state_dict())
            bn.num_splits = num_splits
            setattr(module, name, bn)
        else:
            to_split_bn(child, num_splits)
    return module


@torch.no_grad()
def shuffle_bn(encoder, x_all, shuffle, accelerator):
    """Shuffle BN: the global batch x_all (N, ...) in the order `shuffle` (a permutation of N, the same on every
    process); this process encodes its 1/world share with `encoder` (to_split_bn: its BN groups); the outputs of all
    processes are gathered and put back in order -> (N, D). The result does not depend on the number of processes."""
    share = rearrange(shuffle, "(w n) -> w n", w=accelerator.num_processes)[accelerator.process_index]
    return accelerator.gather(encoder(x_all[share]).contiguous())[torch.argsort(shuffle)]
