"""SNLI-VE: fine-tune and/or evaluate the 3-way entailment head (accuracy on val and test).

python -m finetune.ve finetune/configs/snli_ve.yaml init.checkpoint=ALBEF_4M.pth
python -m finetune.ve finetune/configs/snli_ve.yaml init.checkpoint=ve.pth train.evaluate_only=true
"""

from albef.engine.cli import main
from albef.tasks.ve import VETask

if __name__ == "__main__":
    main(VETask)
