"""Write a hub-ready folder (weights, config with auto_map, modelling code, tokenizer, model card).

    python scripts/export_for_hub.py --model outputs/train/final --card model_cards/osdn-340m.md --out hub/osdn-340m

The folder loads anywhere with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`, osdn_hf not installed.
"""

import argparse

from osdn_hf.export import export_for_hub


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="OSDN checkpoint folder")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--card", required=True, help="model card markdown with YAML metadata")
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-size", default="5GB")
    args = p.parse_args(argv)
    out = export_for_hub(args.model, args.out, args.card, args.tokenizer, args.max_shard_size)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
