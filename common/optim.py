"""Optimisers: LARS, and `make_optimizer`, the one place that turns --optimizer into a torch optimiser.

LARS (You et al. 2017, https://arxiv.org/abs/1708.03888, Algorithm 1) as the large-batch self-supervised recipes run
it: SGD with momentum whose step for each parameter tensor is scaled by a trust ratio eta * ||w|| / ||g||, with biases
and BatchNorm parameters left out of both the adaptation and the weight decay. BYOL (https://arxiv.org/abs/2006.07733,
Sec. 3.3, "Optimization"): "a global weight decay parameter of 1.5e-6 while excluding the biases and batch
normalization parameters from both LARS adaptation and weight decay"; SimCLR's reference LARS
(https://github.com/google-research/simclr, lars_optimizer.py and model_util.py) excludes 'batch_normalization' and
'bias' variables the same way. In a torchvision ResNet these are exactly the parameters with ndim <= 1.
"""
import torch

# LARS's trust coefficient: You et al. 2017, Sec. 3 ("eta < 1 is a trust coefficient") with 0.001 in their runs; the
# default of SimCLR's lars_optimizer.py (EETA_DEFAULT = 0.001) and of MoCo v3's LARS (https://arxiv.org/abs/2104.02057)
LARS_ETA = 0.001


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling, per parameter tensor w with gradient g:

        g <- g + weight_decay * w
        r  = eta * ||w|| / ||g||     (1 where ||w|| = 0 or ||g|| = 0: a fresh zero tensor, or no signal)
        v <- momentum * v + r * g
        w <- w - lr * v

    A param group with `lars_exclude=True` skips the first two lines (no weight decay, r = 1): plain SGD with momentum,
    for biases and BatchNorm parameters (make_optimizer puts every parameter with ndim <= 1 there).

    The step reads no tensor value on the host (the zero-norm cases are a torch.where), so on CUDA it queues its
    kernels without waiting for the GPU. `lr` may change between steps (the scripts set the scheduled lr every step).
    """

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0, eta=LARS_ETA, lars_exclude=False):
        if lr < 0 or not 0 <= momentum <= 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay} or eta={eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=lars_exclude))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"] != 0:
                        g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    # both branches are computed; the division's inf/nan where a norm is 0 is never selected
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, 1.0)
                    g = g * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                v = state["momentum_buffer"]
                v.mul_(group["momentum"]).add_(g)
                p.add_(v, alpha=-group["lr"])
        return loss


def _fused():
    """Whether SGD and Adam may run fused: not under fp16 (see make_optimizer). The precision is the Accelerator's,
    which every script makes before its optimiser (AcceleratorState is shared by the process)."""
    from accelerate.state import AcceleratorState
    return AcceleratorState._shared_state.get("_mixed_precision", "no") != "fp16"


def make_optimizer(cfg, module, lr=None, nesterov=False):
    """The optimiser of --optimizer over `module.parameters()` (an nn.Module; every parameter, in that order):

    sgd:  torch.optim.SGD, weight decay on every parameter (the scripts' small-data protocol);
    lars: LARS with two groups, ndim >= 2 (adapted, weight decay) and ndim <= 1 (biases, BatchNorm: excluded);
    adam: torch.optim.Adam with L2 weight decay on every parameter.

    SGD and Adam run fused (one kernel per step for all parameters, CUDA or CPU) unless the run is fp16: a fused
    step takes GradScaler's inf flag on the device and skips there, and Accelerate then reports the skipped step as
    taken (optimizer_step_was_skipped False; tests/test_optim.py shows it), which would move the EMA, queues and
    groups gated on it. Under fp16 they stay unfused and GradScaler reads its flag on the host, one sync per step;
    bf16 needs no scaler.
    cfg.lr is the initial lr unless `lr` is given (the scripts set the scheduled lr every step anyway); cfg.momentum
    and cfg.weight_decay as named. `nesterov`: Nesterov momentum, for sgd only.
    """
    lr = cfg.lr if lr is None else lr
    if nesterov and cfg.optimizer != "sgd":
        raise ValueError(f"Nesterov momentum is implemented for --optimizer sgd only, not {cfg.optimizer}")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(module.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=nesterov, fused=_fused())
    if cfg.optimizer == "lars":
        params = list(module.parameters())
        groups = [{"params": [p for p in params if p.ndim >= 2]},
                  {"params": [p for p in params if p.ndim <= 1], "lars_exclude": True, "weight_decay": 0.0}]
        return LARS([g for g in groups if g["params"]], lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(module.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=_fused())
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: one of sgd, lars, adam")
