"""Weakly supervised visual grounding (RefCOCO+): fine-tune and/or evaluate with Grad-CAM, on the shared engine.

    python -m finetune.grounding finetune/configs/grounding_refcoco+.yaml init.checkpoint=ALBEF.pth
    python -m finetune.grounding finetune/configs/grounding_refcoco+.yaml init.checkpoint=refcoco.pth \
        train.evaluate_only=true

Metrics (val/acc, test/acc_testA, test/acc_testB), result JSONs and overlay PNGs: see ``albef.tasks.grounding``.
Pictures for any image and expression: ``python -m finetune.visualize_grounding``.
"""

from albef.engine.cli import main
from albef.tasks.grounding import GroundingTask

if __name__ == "__main__":
    main(GroundingTask)
