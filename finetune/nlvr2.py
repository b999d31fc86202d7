"""NLVR2: fine-tune and/or evaluate the two-image model (accuracy on dev and test).

python -m finetune.nlvr2 finetune/configs/nlvr2.yaml init.checkpoint=runs/nlvr2_ta/final.pth
python -m finetune.nlvr2 finetune/configs/nlvr2.yaml init.checkpoint=nlvr.pth train.evaluate_only=true
"""

from albef.engine.cli import main
from albef.tasks.nlvr import NLVRTask

if __name__ == "__main__":
    main(NLVRTask)
