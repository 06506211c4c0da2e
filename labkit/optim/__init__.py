"""Large-batch optimizers, each from its paper (lesson 4).

    schedules   the linear scaling rule and gradual warm-up (Goyal et al. 2017)
    lars        LARS: SGD with a per-layer learning rate (You, Gitman, Ginsburg 2017)
    lamb        LAMB: Adam with a per-layer trust ratio (You et al. 2020), fast and readable paths
    lamb_sharded  LAMB on sharded optimizer state (ZeRO-1): the whole tensors' norms from the slices
    adascale    AdaScale: the learning rate times the gain ratio of the batch (Johnson et al. 2020)
    references  the independent implementations they are checked against (timm, torch_optimizer, fairscale)
"""

from labkit.optim.adascale import AdaScale
from labkit.optim.lamb import Lamb, lamb_param_groups
from labkit.optim.lamb_sharded import sharded_lamb_step, whole_norms
from labkit.optim.lars import LARS
from labkit.optim.schedules import linear_scaling_warmup, scaled_lr, warmup_factor

__all__ = ["AdaScale", "LARS", "Lamb", "lamb_param_groups", "linear_scaling_warmup", "scaled_lr", "warmup_factor",
           "sharded_lamb_step", "whole_norms"]
