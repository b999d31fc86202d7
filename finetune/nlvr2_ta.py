"""NLVR2 text-assignment pretraining: one epoch on the 4M image-text data, before finetune.nlvr2.

python -m finetune.nlvr2_ta finetune/configs/nlvr2_ta.yaml init.checkpoint=ALBEF_4M.pth
"""

from albef.engine.cli import main
from albef.tasks.nlvr import NLVRPretrainTask

if __name__ == "__main__":
    main(NLVRPretrainTask)
