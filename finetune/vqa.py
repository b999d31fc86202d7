"""VQA v2 with the answer decoder: fine-tune and/or evaluate (result JSON for EvalAI, local VQA accuracy).

python -m finetune.vqa finetune/configs/vqa_v2.yaml init.checkpoint=ALBEF_4M.pth
python -m finetune.vqa finetune/configs/vqa_v2.yaml init.checkpoint=vqa.pth train.evaluate_only=true
"""

from albef.engine.cli import main
from albef.tasks.vqa import VQATask

if __name__ == "__main__":
    main(VQATask)
