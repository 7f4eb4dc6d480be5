"""Plumbing shared by the five method scripts: nothing in here is part of any paper's method.

The map, in the order a method script uses it:

    config.py       flags from a dataclass (BaseConfig, parse_config, run_main), errors (UserError, require),
                    and the one seeding rule (seed_for) behind everything random
    data.py         data sets (get_datasets, load_data) and the training batches of views on either path
                    (train_views: DeviceViews on the training device or WorkerViews in DataLoader workers)
    optim.py        the optimisers --optimizer names (make_optimizer: SGD, LARS, Adam)
    distributed.py  across GPUs without host syncs: the all-gather that keeps gradients (gather_with_grad),
                    BatchNorm over the global batch (global_batchnorm) or in MoCo's shuffle-BN groups (shuffle_bn)
    views.py        what a view is (ViewSpec), its torchvision pipeline, and the batched engine the device path runs
    run.py          the accelerator (make_accelerator, fast_model) and the run (Run: folder, metrics, kNN monitor,
                    checkpoints, resume, stops), checkpoint files and the evaluation helpers (knn_predict,
                    effective_rank)

Everything a paper describes lives in its own script.
"""
from .config import (BaseConfig, RUN_ONLY_FIELDS, UserError, check_base_config, check_divides, explicit_flags,
                     generator, parse_config, require, resolve_recipe, run_main, seed_for)
from .data import (DEVICE_BUDGET_BYTES, IMAGE_SIZE, IMAGENET_MEAN_STD, MEAN_STD, DeviceViews, FakeImages, MultiView,
                   Transformed, WorkerViews, check_enough_images, device_bytes, eval_batch, eval_transform, get_datasets,
                   load_data, make_loader, per_process_batch, train_views)
from .distributed import (GlobalBatchNorm, SplitBatchNorm, gather_with_grad, global_batchnorm, shuffle_bn,
                          to_split_bn, world_size)
from .optim import LARS, make_optimizer
from .run import (PROCESS_GROUP_TIMEOUT, NonFiniteLoss, Run, effective_rank, extract_features,
                  extract_features_on_device, fast_model, knn_predict, knn_top1, latest_checkpoint, make_accelerator,
                  plain_name, provenance, save_backbone, zero_grad)
from .views import ViewSpec, apply_view, batched_view, sample_view_params, torchvision_view, view_generator
