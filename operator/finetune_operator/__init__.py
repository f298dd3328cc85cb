"""finetune-operator: FinetuneJob -> distributed fine-tuning pods.

The pure core (api, resolve, objects, crd) imports neither kubernetes nor torch.
"""

__version__ = "0.1.0"
