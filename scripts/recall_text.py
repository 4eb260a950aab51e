"""Recall and write residuals of language models on text (see osdn_hf/recall_text.py)."""

from osdn_hf.recall_text import main

if __name__ == "__main__":
    main()
