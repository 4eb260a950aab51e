"""Fine-tune OSDN as a sequence classifier with the Hugging Face Trainer (see `osdn_hf.classification`).

python scripts/train_classifier.py                      # tiny model, passages of two plays (CPU, about a minute)
python scripts/train_classifier.py --model path/to/checkpoint --data train.csv --label-column sentiment --bf16
"""

from osdn_hf.classification import main

if __name__ == "__main__":
    main()
