"""Profile `chunk_osdn` forward and backward on the GPU: the CUDA kernels that take the time.

python scripts/profile_kernels.py --B 4 --T 4096
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from osdn_hf.ops import chunk_osdn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    B, T, H, D = args.B, args.T, args.H, args.D
    dt = torch.bfloat16
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    beta, eta, lam = (torch.rand(B, T, H, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    do = torch.randn(B, T, H, D, device="cuda", dtype=dt)
    step = lambda: chunk_osdn(q, k, v, beta, eta, lam, use_qk_l2norm_in_kernel=True)[0].backward(do)  # noqa: E731
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
