"""Zero-shot image classification from class names and prompt templates (ITC features; evaluation only).

    python -m finetune.zeroshot finetune/configs/zeroshot.yaml init.checkpoint=ALBEF.pth \
        data.test_file=test.json data.image_root=images/ "data.classes=[cat, dog]"
"""

from albef.engine.cli import main
from albef.tasks.zeroshot import ZeroShotTask

if __name__ == "__main__":
    main(ZeroShotTask)
