"""finetune-train: the trainer that runs in every FinetuneJob worker pod (and on a laptop)."""

__version__ = "0.1.0"
