"""MQAR sweep (Zoology setup) of OSDN, OSDN without APF and DeltaNet; see `osdn_hf.mqar`.

    python scripts/mqar.py --out benchmarks/results/mqar.json --commit SHA            # the full sweep
    python scripts/mqar.py --settings 512:64 --d-models 64 128 --lrs 3e-3 --steps 1500  # a slice
    python scripts/mqar.py --out benchmarks/results/mqar.json --plot-only

Rows are appended to --out after every run, and runs already there are skipped, so a sweep
cut short by a time limit continues where it stopped.
"""

from osdn_hf.mqar import main

if __name__ == "__main__":
    main()
