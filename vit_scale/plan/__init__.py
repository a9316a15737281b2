"""Memory, speed and cost of a training configuration before it is queued (`vit-scale plan`).

hardware    the GPU table and the assumptions about what cannot be measured here
layout      the parameters and modules DeepSpeed sees, from the model on the meta device
zero        model states, DeepSpeed's buffers and communication, per ZeRO stage and offload
activations what autograd saves per micro batch, with and without activation checkpointing
estimate    the plan (memory, fit, time, scaling, cost) and the search for the fastest configuration that fits
"""

from vit_scale.plan.estimate import Cluster, Plan, cluster, fit, make_plan
from vit_scale.plan.hardware import GPUS, gpu_from_constraint, load_table, lookup

__all__ = ["GPUS", "Cluster", "Plan", "cluster", "fit", "gpu_from_constraint", "load_table", "lookup", "make_plan"]
