"""Convert a flash-linear-attention DeltaNetForCausalLM folder into an OSDN checkpoint folder.

    python scripts/convert_deltanet.py path/to/delta_net-1.3B-100B path/to/osdn-1.3b-from-deltanet

The converted model reproduces DeltaNet's logits (its preconditioner starts at d_t = 1);
fine-tune it (scripts/train.py --model PATH) to learn the preconditioner.
"""

import argparse

from osdn_hf.convert import DEFAULT_ETA_INIT, convert_deltanet


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="fla DeltaNetForCausalLM folder (config.json + safetensors)")
    p.add_argument("dst", help="output folder for the OSDN checkpoint")
    p.add_argument("--eta-init", type=float, default=DEFAULT_ETA_INIT, help="initial preconditioner step eta")
    p.add_argument("--apf-init", type=float, default=0.99, help="initial APF retention lam")
    p.add_argument("--max-shard-size", default="5GB")
    args = p.parse_args(argv)
    model = convert_deltanet(
        args.src, args.dst, eta_init=args.eta_init, apf_init=args.apf_init, max_shard_size=args.max_shard_size
    )
    print(f"wrote {args.dst}: {sum(p.numel() for p in model.parameters()):,} parameters, dtype {model.dtype}")


if __name__ == "__main__":
    main()
