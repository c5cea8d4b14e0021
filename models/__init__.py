"""Dynamic-network models built on dynkernels (installed as dynkernels.models)."""
from .blockdrop import (  # noqa: F401
    BlockDrop,
    BlockDropResNet,
    PolicyNet,
    policy_net_cifar,
    policy_net_imagenet,
    resnet32_cifar,
    resnet101_imagenet,
    resnet110_cifar,
)
