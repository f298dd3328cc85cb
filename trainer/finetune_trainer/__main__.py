"""`python -m finetune_trainer` (what torchrun runs in the pods) is `finetune-train`."""

import sys

from finetune_trainer.cli import main

sys.exit(main())
