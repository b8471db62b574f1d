"""Named architectures, in the same form as a user's ``arch.json``.

The paper's presets follow the table in Belilovsky et al. (ICML 2019), section 4;
``fmnist`` is sized for a 2-core CPU and was chosen on a held-out part of the
Fashion-MNIST training set (see docs/demo.md).
"""

CIFAR_TRAINING = {
    "epochs": 50,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_drops": [0.3, 0.6, 0.9],  # lr / 5 after epochs 15, 30, 45 of 50
    "lr_factor": 0.2,
    "augmentation": "crop-flip",  # pad 4, random 32x32 crop, horizontal flip
    "crop_padding": 4,
}

IMAGENET_TRAINING = {
    "epochs": 45,
    "batch_size": 256,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "lr_drops": [20 / 45, 40 / 45],  # lr / 10 after epochs 20 and 40 of 45
    "lr_factor": 0.1,
    "augmentation": "resized-crop",
}


def _stages(widths, downsample_at, batch_norm, k, head_widths=None):
    return [
        {
            "width": width,
            "downsample": j in downsample_at,
            "batch_norm": batch_norm,
            "k": k,
            "head_width": head_widths[j] if head_widths else 0,
        }
        for j, width in enumerate(widths)
    ]


FMNIST_TRAINING = {**CIFAR_TRAINING, "epochs": 6, "crop_padding": 2}

PRESETS: dict[str, dict] = {
    "fmnist": {
        "name": "fmnist",
        "input_shape": [1, 28, 28],
        "num_classes": 10,
        "stages": [
            {"width": 64, "downsample": True, "batch_norm": True, "k": 2, "head_width": 64},
            {"width": 64, "downsample": False, "batch_norm": True, "k": 2, "head_width": 64},
            {"width": 128, "downsample": True, "batch_norm": True, "k": 2, "head_width": 128},
        ],
        "training": FMNIST_TRAINING,
        "notes": "chosen on a 10,000-sample holdout of the training set; see docs/demo.md",
    },
    "cifar10-k1": {
        "name": "cifar10-k1",
        "input_shape": [3, 32, 32],
        "num_classes": 10,
        "stages": _stages([256, 512, 512, 1024, 1024], {1, 3}, False, 1),
        "training": CIFAR_TRAINING,
        "notes": "paper text: psi at j=1 and j=3; the released code downsamples at j=1,2",
    },
    "cifar10-k3": {
        "name": "cifar10-k3",
        "input_shape": [3, 32, 32],
        "num_classes": 10,
        "stages": _stages([128, 128, 256, 256], {2}, True, 3, [256, 256, 512, 512]),
        "training": CIFAR_TRAINING,
    },
    "imagenet-k1": {
        "name": "imagenet-k1",
        "input_shape": [3, 224, 224],
        "num_classes": 1000,
        "stages": _stages([256, 256, 512, 1024, 2048, 2048, 4096, 4096], {0, 2, 3, 4, 6}, False, 1),
        "training": IMAGENET_TRAINING,
    },
    "imagenet-k3": {
        "name": "imagenet-k3",
        "input_shape": [3, 224, 224],
        "num_classes": 1000,
        "stages": _stages(
            [128, 128, 256, 256, 512, 512, 1024, 1024],
            {0, 2, 4, 6},
            True,
            3,
            [256, 256, 512, 512, 1024, 1024, 2048, 2048],
        ),
        "training": IMAGENET_TRAINING,
    },
}
