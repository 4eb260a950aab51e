"""Pretrain or fine-tune OSDN with the Hugging Face Trainer (see `osdn_hf.training` and README.md).

python scripts/train.py --config configs/osdn-340m --data corpus/*.txt --bf16 --max-steps 200
accelerate launch --config_file configs/accelerate/fsdp.yaml scripts/train.py --model converted-1.3b ...
"""

from osdn_hf.training import main

if __name__ == "__main__":
    main()
