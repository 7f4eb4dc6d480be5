"""BatchNorm over the global batch of several processes, without a host synchronisation.

torch.nn.SyncBatchNorm gathers every process's (mean, invstd, count) and then drops the entries of processes whose
batch was empty with a boolean mask (torch/nn/modules/_functions.py, https://github.com/pytorch/pytorch/issues/78549):
on CUDA that is a device-to-host sync in every BatchNorm layer of every forward, 40-90 per training step of these
scripts. Here every process holds the same number of rows (--batch-size divides evenly over the processes), so the
per-process (mean, variance) pairs combine without counts: ONE differentiable all-gather per layer and no mask.
Forward, backward and running statistics equal BatchNorm on the concatenated global batch (tests/test_batchnorm.py).
"""
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed import nn as dist_nn


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d, 2d or 3d input) whose training statistics span the batches of all processes (equal sizes)."""

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"GlobalBatchNorm expects 2-5 dimensional input, got {x.dim()} dimensions")

    def forward(self, x):
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
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
