"""GPU evidence for a published size: train, generate, save/reload, and throughput against fla DeltaNet.

    python scripts/gpu_model_evidence.py --config configs/osdn-340m --out benchmarks/results/osdn-340m_gpu.json

Builds the model from its config folder, then on one GPU: one bf16 forward+backward;
`--steps` fine-tuning steps with the HF Trainer (bf16, gradient checkpointing) on packed
Shakespeare (tokenizer trained on the spot with the config's vocabulary); `generate` of 128
tokens; save and reload with identical logits; and training throughput (tokens/s) and peak
memory of OSDN and of fla's DeltaNetForCausalLM of the same shapes, same batch, same run:
each model alone first (its peak memory), then both resident and timed in `--rounds`
alternating rounds of `--throughput-steps` steps, the order reversed every round; the
reported ratio is the median of the per-round ratios (`osdn_hf.throughput`).
`--only-throughput` runs the last part alone; `--compile` adds `torch.compile` of OSDN as a third
model to the rounds (each model's first step, which compiles, is timed apart). With
`--config configs/osdn-tiny` it runs on CPU as a dry run (no fla comparison, no throughput).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

import osdn_hf  # noqa: F401  registers the Auto classes
from osdn_hf.data import pack_blocks, shakespeare_texts, train_bpe_tokenizer
from osdn_hf.run_info import run_metadata
from osdn_hf.throughput import alternate, fla_deltanet_kwargs, measure_alone, ratio_summary, training_step
from osdn_hf.training import CHECKPOINTING_ARG


def model_checks(config, tokenizer, blocks, args, device, result, stage, save):
    """Stages 1-4: a bf16 forward+backward, Trainer steps, generate, save and reload."""
    stage("build")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    result["parameters"] = sum(p.numel() for p in model.parameters())

    # 1. one bf16 forward+backward
    stage("forward+backward")
    ids = blocks[: args.batch].to(device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
    result["fwd_bwd"] = {"loss": loss.item(), "grads_finite": grads_finite}
    model.zero_grad(set_to_none=True)
    save()

    # 2. fine-tuning steps with the Trainer
    stage("Trainer")
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            learning_rate=6e-4,
            warmup_steps=max(args.steps // 10, 1),
            lr_scheduler_type="cosine",
            bf16=device == "cuda",
            **{CHECKPOINTING_ARG: True},
            logging_steps=max(args.steps // 20, 1),
            save_strategy="no",
            report_to=[],
            use_cpu=device == "cpu",
            dataloader_num_workers=0,
        )
        data = [{"input_ids": row} for row in blocks.tolist()]  # no `datasets` needed on the GPU machine
        start = time.time()
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=data,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        )
        trainer.train()
        losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
        result["trainer"] = {
            "steps": args.steps,
            "batch": args.batch,
            "seq": args.seq,
            "seconds": time.time() - start,
            "losses": losses,
            "loss_falls": losses[-1][1] < losses[0][1],
        }
        save()

    # 3. generate 128 tokens, 4. save and reload
    stage("generate, save and reload")
    # Trainer(bf16=True) leaves accelerate's autocast wrapper on model.forward; unwrap it, or the
    # trained model would run under autocast and return fp32 logits while its reload does not.
    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    model.eval()
    model.to(torch.bfloat16 if device == "cuda" else torch.float32)
    prompt = tokenizer("ROMEO:", return_tensors="pt").to(device)
    start = time.time()
    gen = model.generate(**prompt, max_new_tokens=128, min_new_tokens=128, do_sample=False)
    result["generate"] = {
        "new_tokens": gen.shape[1] - prompt["input_ids"].shape[1],
        "seconds": time.time() - start,
        "text": tokenizer.decode(gen[0])[:400],
    }
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=model.dtype).to(device).eval()
        with torch.no_grad():
            a, b = model(ids[:1, :256]).logits, reloaded(ids[:1, :256]).logits
        result["save_reload"] = {"dtype": str(model.dtype), "identical_logits": bool(torch.equal(a, b))}
    save()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/osdn-340m")
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--throughput-steps", type=int, default=10, help="timed steps per model in each round")
    p.add_argument("--rounds", type=int, default=6, help="alternating throughput rounds (order reversed each round)")
    p.add_argument("--only-throughput", action="store_true", help="skip the Trainer, generate and save/reload stages")
    p.add_argument("--compile", action="store_true", help="time torch.compile(OSDN) too, a third model in the rounds")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = dict(config=args.config, **run_metadata(args.commit, "scripts/gpu_model_evidence.py", argv))
    out = Path(args.out)

    t0 = time.time()

    def stage(name):  # a line per stage, so a run cut short shows where
        print(f"[{time.time() - t0:7.1f} s] {name}", file=sys.stderr, flush=True)

    def save():
        out.write_text(json.dumps(result, indent=1))

    stage("tokenizer")
    config = AutoConfig.from_pretrained(args.config)
    texts = shakespeare_texts()
    tokenizer = train_bpe_tokenizer(texts, vocab_size=config.vocab_size)
    config.update(
        dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    blocks = pack_blocks(tokenizer("\n".join(texts))["input_ids"], args.seq)
    if not args.only_throughput:
        # a copy: save_pretrained of the bf16 model writes dtype=bfloat16 into the config it was built from,
        # and a model built later from that config would train in pure bf16 against fla's float32 weights
        model_checks(copy.deepcopy(config), tokenizer, blocks, args, device, result, stage, save)
        gc.collect()  # the throughput figures count peak memory from here: nothing of the checks may stay
        if device == "cuda":
            torch.cuda.empty_cache()

    # 5. throughput and memory against fla's DeltaNet of the same shapes (gradient checkpointing on both):
    # each alone first for its peak memory, then both resident, timed in alternating rounds
    stage("throughput")
    if device == "cuda":
        from fla.models import DeltaNetConfig, DeltaNetForCausalLM

        tokens = args.batch * args.seq
        fla_config = DeltaNetConfig(**fla_deltanet_kwargs(config))
        steps = {}
        builds = [
            ("osdn", lambda: AutoModelForCausalLM.from_config(config, dtype=torch.float32)),
            ("fla_deltanet", lambda: DeltaNetForCausalLM(fla_config)),
        ]
        if args.compile:
            builds.append(
                ("osdn_compiled", lambda: torch.compile(AutoModelForCausalLM.from_config(config, dtype=torch.float32)))
            )
        for name, build in builds:
            base = torch.cuda.memory_allocated()
            torch.manual_seed(0)
            with torch.device(device):  # built where it runs: a 1.3B init on the CPU takes minutes
                model = build()
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            parameters = sum(p.numel() for p in model.parameters())
            dtypes = sorted({str(p.dtype) for p in model.parameters()})
            steps[name] = training_step(model, args.batch, args.seq, device)
            start = time.perf_counter()  # the first step: kernels' compilation, and torch.compile's
            steps[name]()
            torch.cuda.synchronize()
            first_step_s = time.perf_counter() - start
            result[f"throughput_{name}"] = measure_alone(
                steps[name], tokens, args.throughput_steps, device, base_bytes=base
            )
            result[f"throughput_{name}"].update(
                parameters=parameters, parameter_dtypes=dtypes, first_step_s=first_step_s
            )
            save()
        stage("throughput, alternating rounds")
        result["throughput_rounds"] = alternate(steps, tokens, args.throughput_steps, args.rounds, device)
        o, f = result["throughput_osdn"], result["throughput_fla_deltanet"]
        result["ratios"] = {
            "tokens_per_s": result["throughput_rounds"]["ratio"]["median"],
            "tokens_per_s_range": [
                result["throughput_rounds"]["ratio"]["min"],
                result["throughput_rounds"]["ratio"]["max"],
            ],
            "tokens_per_s_first_block": o["tokens_per_s"] / f["tokens_per_s"],
            "peak_memory": o["peak_mib"] / f["peak_mib"],
        }
        if args.compile:
            per_round = result["throughput_rounds"]["tokens_per_s"]
            c = result["throughput_osdn_compiled"]
            result["ratios"]["compiled"] = {
                "tokens_per_s_over_eager": ratio_summary(
                    per_round["osdn_compiled"], per_round["osdn"], "compiled / eager"
                ),
                "tokens_per_s_over_fla": ratio_summary(
                    per_round["osdn_compiled"], per_round["fla_deltanet"], "compiled / fla_deltanet"
                ),
                "peak_memory_over_eager": c["peak_mib"] / o["peak_mib"],
            }
    save()

    print(json.dumps({k: v for k, v in result.items() if k != "trainer"}, indent=1))
    if "trainer" in result:
        print("trainer losses:", result["trainer"]["losses"])


if __name__ == "__main__":
    main()
