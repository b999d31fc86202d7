"""Image-text retrieval: fine-tune and/or evaluate (TR/IR R@1/5/10) with the shared DeepSpeed engine.

python -m finetune.retrieval finetune/configs/retrieval_coco.yaml init.checkpoint=ALBEF_4M.pth
python -m finetune.retrieval finetune/configs/retrieval_flickr.yaml init.checkpoint=mscoco.pth train.evaluate_only=true
"""

from albef.engine.cli import main
from albef.tasks.retrieval import RetrievalTask

if __name__ == "__main__":
    main(RetrievalTask)
