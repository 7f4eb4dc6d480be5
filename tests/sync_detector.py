"""A CPU stand-in for `torch.cuda.set_sync_debug_mode("error")`: a TorchDispatchMode that records every op that would
make the host wait for the GPU (or copy a Python value to it) if the same code ran on CUDA.

Recorded: reading a tensor's value on the host (`aten._local_scalar_dense`: .item(), float(), bool(); and .tolist(),
.numpy(), which read memory without an aten op and are recorded by wrapping them while the mode is active),
ops whose output size depends on values (nonzero, masked_select, boolean-mask indexing, unique), linear-algebra
calls with a host-side error check (SVD, eigh, ...), and tensors made from Python data inside the step
(torch.tensor / torch.as_tensor of a Python number or list: a host-to-device copy on CUDA).
Not visible to it on the CPU: `.to(device)` of a CPU tensor (the copy is a no-op here) and tensors made on the host
without a device; `HostTensors`, a TorchFunctionMode, records those.

    with SyncDetector() as syncs:
        train_step(...)
    assert syncs.ops == [], syncs.ops
"""
import os
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_VALUE_DEPENDENT = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                    "unique_consecutive", "unique_dim", "repeat_interleave_tensor_only"}
_CHECKED_LINALG = ("svd", "eigh", "eig", "cholesky", "inv", "solve", "lstsq", "lu", "qr")
_FROM_PYTHON = {"lift_fresh", "lift_fresh_copy"}  # scalar_tensor is a wrapped number (torch.where(c, x, 0.0)): no copy


def _bool_index(args):
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()) if i is not None)


class SyncDetector(TorchDispatchMode):
    """Records the names of the ops that would synchronise a CUDA device, in order, in `self.ops`."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self._saved = {}

    def __enter__(self):
        for name in ("tolist", "numpy"):  # host reads that bypass the dispatcher
            original = self._saved[name] = getattr(torch.Tensor, name)

            def recording(t, *a, _name=name, _original=original, **k):
                self.ops.append(_name)
                return _original(t, *a, **k)
            setattr(torch.Tensor, name, recording)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if (name in _VALUE_DEPENDENT or name in _FROM_PYTHON
                or (name.startswith("linalg_") or name.startswith("_linalg_")) and any(k in name for k in _CHECKED_LINALG)
                or name in ("svd", "_svd_helper")
                or name in ("index", "index_put", "index_put_", "_index_put_impl_") and _bool_index(args)):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _called_from_this_repo():
    """Whether the innermost Python frame outside this file is this repository's code: torch's own moves of a tensor
    to the device it is already on (clip_grad_norm_'s `norm.to(first_device)`) are no copies on CUDA."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename != __file__:
            return "site-packages" not in frame.filename and os.sep + "torch" + os.sep not in frame.filename
    return False


class HostTensors(TorchFunctionMode):
    """What SyncDetector cannot see on the CPU: tensors built on the host inside the step (a factory given no device)
    and `.to(device)` / `.cuda()` calls, each a host-to-device copy when the step runs on CUDA; recorded when this
    repository's code makes them."""

    FACTORIES = {torch.randperm, torch.randint, torch.rand, torch.randn, torch.arange, torch.zeros, torch.ones,
                 torch.empty, torch.full, torch.tensor, torch.as_tensor}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        to_device = name in ("to", "cuda") and ("device" in kwargs or any(isinstance(a, (torch.device, str))
                                                                         for a in args[1:]))
        if ((func in self.FACTORIES and kwargs.get("device") is None) or to_device) and _called_from_this_repo():
            self.calls.append(name)
        return func(*args, **kwargs)
