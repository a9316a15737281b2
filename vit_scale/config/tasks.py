"""Datasets known by name: the 19 VTAB-1k tasks, and the augmentations that change some of their labels.

Augmentation is a property of the dataset, not only of the recipe: mirroring a dSprites image moves its
sprite to the mirrored position bin, cropping a CLEVR scene can cut out objects it counts. A task is known
by name: `data.task`, or the `task` that `vit-scale shards build --format vtab` records in a shard
directory's index.json (validate reads both). The VTAB-1k protocol itself resizes only (configs/vtab/);
these rules stop an override or another recipe from training or scoring such a task off its label.

What each setting does to the image:
- a crop: `data.augment=inception` (a random crop and a new aspect ratio), `data.augment=center` and
  `data.eval_crop=center` (the borders of a non-square image are cut);
- a flip: `data.hflip=true` under `data.augment=inception`;
- `data.randaugment`: rotations, shears and translations among its operations, so it is refused wherever
  either rule applies.
"""

from __future__ import annotations

from typing import Literal

# The paper's 19 VTAB-1k tasks (its appendix): group and number of classes, in the paper's order.
VTAB_TASKS: dict[str, tuple[str, int]] = {
    "caltech101": ("Natural", 102),
    "cifar100": ("Natural", 100),
    "dtd": ("Natural", 47),
    "oxford_flowers102": ("Natural", 102),
    "oxford_iiit_pet": ("Natural", 37),
    "sun397": ("Natural", 397),
    "svhn": ("Natural", 10),
    "patch_camelyon": ("Specialized", 2),
    "eurosat": ("Specialized", 10),
    "resisc45": ("Specialized", 45),
    "diabetic_retinopathy": ("Specialized", 5),
    "clevr_count": ("Structured", 8),
    "clevr_dist": ("Structured", 6),
    "dmlab": ("Structured", 6),
    "dsprites_loc": ("Structured", 16),
    "dsprites_ori": ("Structured", 16),
    "kitti_dist": ("Structured", 4),
    "smallnorb_azi": ("Structured", 18),
    "smallnorb_ele": ("Structured", 9),
}
GROUPS = ("Natural", "Specialized", "Structured")
# Other names the tasks go by (SLURM array templates, task_adaptation's registry).
ALIASES = {
    "smallnorb_elev": "smallnorb_ele",
    "oxford_pet": "oxford_iiit_pet",
    "flowers102": "oxford_flowers102",
}

Change = Literal["flip", "crop"]

# task -> {change: why it changes the label}. Label definitions: google-research/task_adaptation's data/*.py.
LABEL_CHANGING: dict[str, dict[Change, str]] = {
    "dsprites_loc": {
        "flip": "its label is the sprite's horizontal position, which a mirror moves to the mirrored bin",
        "crop": "its label is the sprite's horizontal position, which a crop shifts and rescales",
    },
    "dsprites_ori": {
        "flip": "its label is the sprite's orientation, which a mirror reverses",
        "crop": "its label is the sprite's orientation, which the crop's aspect change (3/4..4/3) skews",
    },
    "smallnorb_azi": {
        "flip": "its label is the camera azimuth, and a mirror shows the object from the mirrored azimuth",
    },
    "smallnorb_ele": {
        "crop": "its label is the camera elevation, read from vertical foreshortening, which the crop's "
        "aspect change (3/4..4/3) alters by up to two of its 5-degree bins",
    },
    "clevr_count": {
        "crop": "its label is the number of objects, and a crop can cut objects out",
    },
    "clevr_dist": {
        "crop": "its label is the depth of the closest object, which a crop's zoom changes or cuts out",
    },
    "kitti_dist": {
        "crop": "its label is the distance to the closest vehicle (or none), which a crop's zoom changes or "
        "cuts out",
    },
    "dmlab": {
        "crop": "its label is how far the objects are, and a crop's zoom brings them closer or cuts them out",
    },
    "svhn": {
        "flip": "its label is the centre digit, and a mirrored digit is another one (2 and 5) or none",
        "crop": "its label is the centre digit, which a crop can cut out or replace with a neighbour",
    },
    "patch_camelyon": {
        "crop": "its label says whether the central 32x32 pixels hold tumour, and a crop moves or drops them",
    },
}


def canonical(task: str) -> str:
    """The task's name in VTAB_TASKS (aliases resolved), or the name unchanged when it is not a VTAB task."""
    return ALIASES.get(task, task)


def rule(task: str, change: Change) -> str | None:
    """Why `change` alters `task`'s labels, or None when it does not (or the task is not known)."""
    return LABEL_CHANGING.get(canonical(task), {}).get(change)


def refusal(task: str, augment: str, hflip: bool, randaugment: str, eval_crop: str) -> str | None:
    """Why these settings would change `task`'s labels (one line naming the task and what to set), or None."""
    rules = LABEL_CHANGING.get(canonical(task), {})
    # (applies, the rule it breaks, the setting, what it does, the fix)
    checks = [
        (augment in ("inception", "center"), "crop", f"data.augment={augment}", "crops the training images",
         "use data.augment=resize"),
        (augment == "inception" and hflip, "flip", "data.hflip=true", "mirrors the training images",
         "set data.hflip=false"),
        (eval_crop == "center", "crop", "data.eval_crop=center", "crops the images scored",
         "use data.eval_crop=none"),
    ]  # fmt: skip
    for applies, change, setting, does, fix in checks:
        if applies and change in rules:
            return f"{setting} {does}, but {task}: {rules[change]}; {fix}"
    if randaugment and rules:
        why = rules.get("flip") or rules["crop"]
        return (
            f"data.randaugment={randaugment!r} rotates, shears and shifts the training images, but {task}: "
            f"{why}; set data.randaugment=''"
        )
    return None
