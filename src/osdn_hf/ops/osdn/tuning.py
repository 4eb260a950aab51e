"""Launch settings of the chunked op's Triton kernels, each with the measurements that chose it.

`SCAN_TUNING` (the four scans of `chunk_scan.py`), `CHUNK_LAUNCH` (the per-chunk kernels),
`INVERSE` (how the diagonal blocks of the inverses are inverted), `IEEE_LAUNCH` and `TF32_LAUNCH`
(float32 storage), `GRAD_STORAGE` (the dtype of the gradient pieces between backward kernels) and
`PHASE1` (phase 1's chunks). `chunk_fused.py` reads them at every call, so a change made in place
(`scripts/profile_kernels.py --tune`, the tests) takes effect at the next one;
`launch_settings()` copies them for results to record.

The notes name functions without their module: they are
`chunk_fused.py`'s, but for `_decay_matrix` (`chunk_precond.py`) and `_unit_lower_inverse_blocked`
(`chunk_kernels.py`).
"""

import copy

# Launch settings of the two chunk scans (sequential over chunks, parallel over batch, head and
# V blocks). `None` keeps `chunk_scan._block_sizes`'s choice; benchmarks/tune can override.
# What both state scans' entries of SCAN_TUNING start from.
_STATE_SCAN = dict(BV=None, BS=None, num_warps=4, num_stages=1, prefetch=True, fill_sms=True)
SCAN_TUNING = {
    # prefetch: load the next chunk while reducing this one (whole chunks, BS = C; heads up to 128
    # wide, as wider chunks do not fit in registers). The defaults are what `profile_kernels.py
    # --tune` measured fastest, forward+backward at 1 x 16384 and 4 x 4096 (H200, bf16, H=16,
    # K=V=128; benchmarks/results/kernels_tune_*): the preconditioner scans' prefetch took 7.95 ->
    # 6.88 ms at 1 x 16384 (both scans, the backward at 8 warps); at 4 x 4096, turning off either
    # scan's costs 0.15-0.21 ms (4.40 -> 4.55-4.61). From there the state scans' prefetch takes
    # forward 6.88 -> 6.51 and 4.40 -> 4.29 ms, backward 6.88 -> 6.20 and 4.40 -> 4.24 ms, each
    # measured alone. The preconditioner scans' warps, measured again per kernel at 4 x 4096,
    # 8 x 2048 and 2 x 8192 (precond_warps_619e60c.json): the defaults stay fastest everywhere.
    # split_below: with fewer than this many (batch, head) scans, the backward scan carries only
    # e's gradient (at split_num_warps) and a kernel parallel over chunks writes the rows' gradients
    # from it (then `precond_rows_bwd_kernel`; since it, `pre_intra_bwd_kernel`, which follows
    # anyway). Measured (kernels_tune_split_groups_*.json): 5.87 -> 5.59
    # ms at 1 x 16384 (16 scans, 4 warps), 4.08 -> 4.13 ms at 8 x 2048 (128 scans); at 2 x 8192
    # (32 scans) 4.63 -> 4.56 ms, at 4 x 4096 (64 scans) 4.13 -> 4.15 ms, level
    # (kernels_tune_split_{2x8192,4x4096}.json), so the line stayed at 128. Since the rows'
    # gradients come from pre_intra_bwd (7a8f347), the split scan wins at every size measured, in
    # the whole forward+backward (H200, bf16, H = 16, K = V = 128; split_exp_26a6d2b.json):
    # 2601 -> 2587 us at 8 x 2048 (128 scans), 2945 -> 2913 at 16 x 1024 (256), so the line is
    # now out of reach (1 << 30) and the one-kernel scan is what the knob can still choose. The
    # split backward also needs no dU buffer (pre_out_bwd adds its share to dK:
    # split_exp_07fbba5.json, launch_sweep_pre_out_bwd_*_07fbba5.json).
    # Grouping phase 1's scans (chunks in parallel groups, each group's K x K map, a short scan over
    # groups) measured no faster and was taken out (953acd4; benchmarks/KERNELS.md).
    # overlap_alone / overlap_shared: with at most one (batch, head) scan per `overlap_alone` SMs,
    # phase 1's forward scans run beside the chunks' making, in one launch with a worker on each
    # SM they leave; with at most one per `overlap_shared`, two workers on each (the scans then
    # share SMs with them); with more, the scans follow their chunks' kernel
    # (`precond_fwd_overlap_kernel`, `_overlap_workers`; prefetching scans only). Why two tiers:
    # scan and workers both take time in proportion to the chunk count, so which one bounds the
    # launch depends on the scans' number alone. Few scans bound it, and must not be slowed by a
    # worker beside them; more scans finish early, and the chunks are made fastest at two workers
    # an SM. Measured alone, pre_intra_fwd and the scan against the overlapped launch (H200,
    # bf16, H = 16, K = 128; benchmarks/results/kernels_overlap_9311f98.json):
    #   1 x 16384 (16 scans): 639 -> 542-558 us at one worker per free SM, 720-740 at two
    #   2 x 8192 (32 scans): 455 -> 494 at one, 380-389 at two
    #   4 x 4096 (64 scans): 360 -> 430 at best (two), so no overlap there
    # The backward's entry holds the same two for its split scan, run beside pre_y and pre_out_bwd
    # (`precond_bwd_overlap_kernel`). Those three kernels against the launch, in the op's
    # forward+backward (kernels_overlap_bwd_a669cb2.json for the prototype, kt2_9c0adce.json):
    #   1 x 16384: 71 + 261 + 458 -> 631 us (one worker per free SM; 691 at two, prototype)
    #   2 x 8192: 71 + 261 + 234 -> 506 us (two; 774 at one, prototype)
    #   4 x 4096: 540 -> 748 at best (two, prototype), so no overlap there either
    # flag_run: how many chunks' flags an overlapped scan reads in one round of acquire atomics
    # (`chunk_scan._wait_for_run`; 1: one atomic on each chunk's way, on the critical path of every
    # step). Measured in the op's forward+backward, the same bits at every setting (H200, bf16,
    # H = 16, K = 128; benchmarks/results/flag_run_{1x16384,2x8192}_cde9700.json), RUN 1/4/8/16:
    #   forward launch: 554/513/514/533 us at 1 x 16384, 377/366/377/394 at 2 x 8192
    #   backward launch: 608/612/617/631 us at 1 x 16384, 478/483/494/517 at 2 x 8192
    # Alone at 1 x 16384 the forward scans take 377 us without flags and 511 us in the launch with
    # every flag already raised and no workers (flagcost_1x16384_f134c02.json): runs of 4 win back
    # 41 of those 134 us; the rest of that gap is not explained.
    # read_inverse: from this many (batch, head) scans up, phase 1's forward scan reads each chunk's
    # inverse and r and forms Y e_n = (I + L)^{-1} (r * (U e_n)) itself, so pre_intra_fwd writes no
    # Y (None: never). pre_intra_fwd gets faster (142 -> 105 us at 8 x 2048), the scan's chain per
    # chunk longer: worth it where many scans share the GPU, each with few chunks. Measured in one
    # process, GPU time of the forward (H200, bf16, H = 16, K = V = 128;
    # benchmarks/results/sweep20_{ef9715a,95a7077}.json), Y -> inverse: 800 -> 782 us at 8 x 2048
    # (128 scans), 940 -> 914 at 16 x 1024 (256); 856 -> 863 at 4 x 4096 (64), 984 -> 1003 at
    # 2 x 8192 and 1177 -> 1204 at 1 x 16384 (overlapped). Writing W in the scan too (no
    # pre_out_fwd) was slower everywhere but 16 x 1024: 782 -> 804 us at 8 x 2048, 863 -> 971 at
    # 4 x 4096 (95a7077; taken out).
    # groups: where a backward will follow and phase 1's scans are few enough to run beside their
    # chunks' making (`_precond_groups`), phase 1 runs in chunks of 32, reading each chunk's
    # inverse (read_inverse), and its scans in groups of `length` chunks (`long_length` from
    # `long_from` chunks; at least `min_groups` groups): each group's K x K map (BJ columns a
    # program, num_warps, num_stages), the groups' starts (starts_num_warps), every group scanned
    # again; the backward reuses the maps (`_precond_scan_grouped`, `_precond_scan_bwd_grouped`).
    # GPU time against the overlapped launches in one process (H200, bf16, H = 16, K = V = 128;
    # benchmarks/results/grp31d_37992ad.json), forward+backward: 3195 -> 2896 us at 1 x 16384
    # (groups of 32), 6289 -> 5551 at 1 x 32768 (32), 2714 -> 2564 at 2 x 8192 (16), 1646 -> 1527
    # at 1 x 8192 (16), 1417 -> 1358 at 2 x 4096 (16), 862 -> 829 at 1 x 4096 (16); the forward
    # of such a step is up to 8% slower (the maps; 968 -> 1036 us at 2 x 8192), while a forward
    # without gradients keeps the overlapped launch. Groups of 16 at 1 x 16384 took 2912 us, of 32
    # at 1 x 8192 1578 and at 1 x 4096 877. Grouped scans in chunks of 64, Y stored, were slower
    # (grp31_3fb6230.json, grp31b_658210f.json, grp31c_39e6766.json); so were the maps at 8 warps
    # (3112 us at 1 x 16384) and at BJ 32 (2936). The maps multiply float16 roundings of their
    # operands where the keys are unit (dot16, num_stages 2; `chunk_scan.precond_group_maps_kernel`):
    # 2922 -> 2871 us at 1 x 16384 and 2572 -> 2529 at 2 x 8192, the forward of such a step 1124 ->
    # 1078 and 1042 -> 998, outputs and gradients the same to the bit (grp32c_e40adb4.json). Slower
    # or level: X^T (BJ rows in every product; grp32_5a4f658.json), the next chunk prefetched by
    # hand, the product accumulating into X (grp32b_1696ccf.json), and dot16 at 8 warps or BJ 32.
    "precond_fwd": dict(
        BS=None,
        num_warps=4,
        num_stages=1,
        prefetch=True,
        overlap_alone=8,
        overlap_shared=4,
        flag_run=4,
        read_inverse=128,
        groups=dict(
            length=16,
            long_length=32,
            long_from=512,
            min_groups=8,
            BJ=64,
            num_warps=4,
            num_stages=2,
            dot16=True,
            starts_num_warps=8,
            read_inverse=True,
        ),
    ),
    "precond_bwd": dict(
        BS=None,
        num_warps=8,
        num_stages=1,
        prefetch=True,
        split_below=1 << 30,
        split_num_warps=4,
        overlap_alone=8,
        overlap_shared=4,
        flag_run=1,
    ),
    # The state scans run one program per (batch, head, V block): at heads up to 128 wide, with
    # fewer programs than the GPU has SMs, BV halves (down to 16) until they fill them. Then the
    # forward scan, with at most `pipeline_waves` programs per SM, keeps no hand prefetch but lets
    # Triton pipeline its loop over chunks `pipeline["num_stages"]` deep, BS rows at a time with
    # BS * BV = `pipeline["slice"]` (BV up to `pipeline["max_BV"]`, the widths measured). Measured
    # in the whole forward+backward (H200, bf16, H=16, K=V=128;
    # benchmarks/results/kernels_scan_stages{,2}_3f6d0ac.json), the forward scan's two calls:
    #   1 x 16384 (64 programs at BV 32): 771 -> 358 us (BV 16, BS 64, 3 deep; the step 4499 -> 4081)
    #   4 x 4096 (256 programs): 281 -> 239 us (BV 32, BS 32, 3 deep)
    #   8 x 2048 (512 programs): prefetching stays fastest (330 us; 349 pipelined)
    # The backward scan only narrows: 481 -> 439 us at 1 x 16384 (BV 16); pipelining its loop was
    # slower at every size (212 -> 278 us at 4 x 4096, 481 -> 657 at 1 x 16384), and so were the
    # preconditioner scans' (one program per (batch, head), 102 -> 292 us and more).
    # First landed in f53a9cc, it was reverted when it faulted at T = 1 (one chunk;
    # kernels_scan_launch_faults_f53a9cc.json): the scans were then compiled with NC == 1 as a
    # constant, which Triton 3.6 miscompiles (kernels_scan_nc1.json; fixed by chunk_scan's
    # _scan_jit). It came back after scripts/check_scans.py passed on the GPU at every regime's
    # launch and tile, NC 1-3 (kernels_scan_launches_*.json). The tile BV 16, BS 64 without
    # prefetch at num_stages 1 is miscompiled at any NC (kernels_scan_nc1.json); no regime uses it.
    # fit (16-bit storage, heads up to 128 wide; it goes first, so the settings above are those of
    # float32 storage, and heads wider than 128 keep the table's): BV starts at 64, not the table's
    # 32, and halves (down to 16) only while the programs fill less than `fill` of the SMs; then
    # whole chunks (BS = C), with the settings of the first entry of `waves` whose programs per SM
    # are not exceeded (None: any number). Both scans alone (H200, bf16, H = 16, K = V = 128;
    # benchmarks/results/state_scan_launches_2498554.json), old launch -> new, in us:
    #                  forward      rebuild      backward
    #   8 x 2048:      195 -> 129   143 -> 86    264 -> 180   (BV 32 -> 64; 256 programs)
    #   4 x 4096:      158 -> 124    98 -> 85    219 -> 198   (BV 32 -> 64; 128)
    #   2 x 8192:      191 -> 149   122 -> 107   312 -> 265   (BV 16 -> 32; 128)
    #   1 x 16384:     213           154          433          (BV 16 as before; 128)
    # fla's forward scan (chunk_gated_delta_rule_fwd_h) took 123 / 117 / 197 / 386 us on the same
    # sizes. The backward's prefetching launch runs 8 warps where the state tile is [128, 64] or
    # larger (`big_tile`; at 4 x 4096 198 us, against 359 at 4 warps and 221 at the old BV 32).
    # Until 66b7eb4 `fit` stopped at two programs per SM, and more (from 133 (batch, head) pairs
    # at K = V = 128 on 132 SMs) took the table's BV 32, prefetching. At BV 64 pipelined 2 deep
    # they run in waves of two an SM, and the same bits come out. Measured in one process (H200,
    # bf16, H = 16, K = V = 128; benchmarks/results/sweep21_66b7eb4.json), GPU time:
    #                     forward+backward   state_scan_fwd (both calls)   state_scan_bwd
    #   16 x 1024 (256):  2495 -> 2207 us    423 -> 254                     320 -> 193
    #   16 x 2048 (256):  4878 -> 4258       861 -> 496                     639 -> 381
    #   32 x 1024 (512):  4886 -> 4220       905 -> 496                     639 -> 382
    # (the forward alone 912 -> 790, 1767 -> 1514, 1748 -> 1497). Prefetching at BV 64 (8 warps
    # backward) gave 2252 / 4338 / 4312 us, 3 deep 2275 / 4384 / 4357.
    "state_fwd": dict(
        _STATE_SCAN,
        pipeline_waves=2,
        pipeline=dict(num_stages=3, slice=1024, max_BV=32),
        fit=dict(BV=64, fill=0.75, waves=[[1, dict(num_stages=3)], [None, dict(num_stages=2)]]),
    ),
    "state_bwd": dict(
        _STATE_SCAN,
        fit=dict(
            BV=64,
            fill=0.75,
            waves=[[1, dict(num_stages=1, PREFETCH=True)], [None, dict(num_stages=2)]],
            big_tile=dict(elements=8192, num_warps=8),
        ),
    ),
}
# The reverse state scan forming the output's share of the states' gradient, scale Q^T dO, itself
# (as fla's dhu kernel does; out_bwd would then write no K x V per chunk) was slower in every
# setting tried (e39d748, taken out; benchmarks/results/kernels_qdo_fwdloops_e39d748.json): out_bwd
# and the scan together 333 -> 357 us at best at 4 x 4096 (BS 32, Triton pipelining the chunk loop
# 2 deep), 613 -> 650 at 1 x 16384 (BS 64, 3 deep), where the scan alone ran 2.2-2.6x longer with
# the next chunk's q and dO loaded ahead as well.
# Launch settings of the per-chunk kernels: num_warps, and the widest K or V block a kernel walks
# (16, 32 or 64; narrower blocks hold fewer registers). The fastest of each kernel measured by
# `scripts/profile_kernels.py --grid`, every setting in a process of its own (H200, bf16,
# K = V = 128, 4 x 4096 and 1 x 16384 alike; benchmarks/results/kernels_grid_{4x4096,1x16384}.json).
# Eight warps: 1.12-2.5x slower than 4 for nine of these kernels, level for pre_y and kb, faster
# only for from_chunks (0.87-0.90x), although compiled offline without the runtime's pointer
# alignment they spill fewer registers (benchmarks/results/compile_resources_bf16_k128_8warps.json;
# with it, at 4 warps, only pre_intra_bwd spills: compile_resources_bf16_k128_aligned_*.json).
# At 16-wide tiles they fault
# (`pre_intra_bwd_kernel` reads shared memory out of bounds, by compute-sanitizer:
# benchmarks/results/sanitizer_8x16.log), so that setting must not be used.
CHUNK_LAUNCH = {
    "pre_intra_fwd": dict(num_warps=4, tile=64),
    "pre_out_fwd": dict(num_warps=4, tile=32),
    # Two forward kernels keep their block loops as loops too (`stages`, below). In the whole
    # forward+backward at 4 x 4096 (benchmarks/results/kernels_qdo_fwdloops_e39d748.json): wy_fwd
    # 249 -> 219 us, pre_y 76 -> 70, the step 3174 -> 3136; the other forward kernels, kept as
    # loops, were level or slower alone (kernels_loops_fwd_adb30a7.json).
    # pre_y and wy_fwd at 2 warps since eb29181, with pre_intra_bwd: below.
    "pre_y": dict(num_warps=2, tile=32, stages=3),
    "wy_fwd": dict(num_warps=2, tile=64, stages=3),
    "kb": dict(num_warps=4, tile=64),
    # out_fwd walks K in blocks of 64 but takes V whole up to 128 (`tile_v`; 16-bit storage only:
    # float32's tables keep `tile` for both, and so does V 256, neither measured): alone at 4 x
    # 4096 x 16 heads of 128 in bf16 (benchmarks/results/of43_a0c78d4.json) 106.7 -> 98.9 us, one
    # program a chunk instead of two, each reading Q and W once; BK 128 at BV 64: 103.2, both 128
    # at 8 warps: 175.
    "out_fwd": dict(num_warps=4, tile=64, tile_v=128),
    # The backward kernels that walk blocks with UNROLL off can keep those walks as loops that
    # Triton software-pipelines (`stages`, its num_stages; None: unrolled). Alone at 4 x 4096 x 16
    # heads of 128 in bf16 on an H200 (benchmarks/results/kernels_loops_7cc8d1f.json), against
    # unrolled at the same tile: state_grads 337 -> 277 us, out_bwd 134 -> 117, wy_bwd 355 -> 317,
    # pre_out_bwd 303 (tile 64) -> 265, pre_intra_bwd 396 -> 363 (tile 32: 417 unrolled). With the
    # gradient pieces in 16 bits (GRAD_STORAGE), the depths one above and one below (wy_bwd: 2, 3)
    # were level or slower for wy_bwd, state_grads, pre_out_bwd and pre_intra_bwd
    # (benchmarks/results/kernels_stages_bwd_0605d62.json).
    "out_bwd": dict(num_warps=4, tile=64, stages=2),
    "state_grads": dict(num_warps=4, tile=64, stages=2),
    "wy_bwd": dict(num_warps=4, tile=64, stages=1),
    # pre_out_bwd, adding dU's share to dK since 07fbba5, held more registers (154 -> 179 at 3
    # stages, offline): 186 -> 207 us alone at 4 x 4096 and 8 x 2048; at 2 stages (168 registers,
    # three programs an SM again) 186-188 us (launch_sweep_pre_out_bwd_{4x4096,8x2048}_07fbba5.json).
    # With P^T formed rather than transposed (`_decay_matrix`), 168 registers at 3 stages too, and
    # 178 us there against 191-193 at 2 (launch_sweep_pre_out_bwd_pt_{4x4096,8x2048}.json).
    "pre_out_bwd": dict(num_warps=4, tile=32, stages=3),
    # pre_intra_bwd, pre_y and wy_fwd at 2 warps (were 4): per kernel, GPU time in one
    # forward+backward, one process, the settings interleaved over 3 rounds (H200, bf16, K = V =
    # 128; benchmarks/results/sweep18_c64_d295546.json), at 3 x 4096, 2 x 8192 and 1 x 16384:
    # pre_intra_bwd 198 -> 147, 262 -> 194, 262 -> 195 us (at 2 stages: 158, 211, 212); wy_fwd
    # 166 -> 161, 219 -> 210, 221 -> 208; pre_y 55 -> 47 (at 2 x 8192 and 1 x 16384 it runs inside
    # precond_bwd_overlap_kernel, at the scan's warps). All three: forward+backward 2212 -> 2151,
    # 2837 -> 2761, 3318 -> 3239 (-2.4 to -2.8%). pre_intra_fwd at 2 warps: its launch with the
    # scans beside it (precond_fwd_overlap_kernel, same warps) 376 -> 646 us at 2 x 8192.
    "pre_intra_bwd": dict(num_warps=2, tile=32, stages=3),
    # The relayouts read whole rows (no tile); num_warps None: 8 from 8192 elements a chunk, else 4
    # (from_chunks at K = 128: 104 us at 8 warps, 116-120 at 4; to_chunks the same at both).
    "to_chunks": dict(num_warps=None, tile=None),
    "from_chunks": dict(num_warps=None, tile=None),
}


# How `_unit_lower_inverse_blocked` inverts the diagonal 16 x 16 blocks of the 64 x 64 (and 32 x 32) inverses
# (`wy_fwd_kernel`, `pre_intra_fwd_kernel`): by forward substitution (15 dependent row steps), or,
# with `doubling`, as the product (I - N)(I + N^2)(I + N^4)(I + N^8) (six batched products), for
# 16-bit inputs only (`_doubling`). Measured on an H200 (benchmarks/results/inverse.json, 4096
# chunks): the inverse alone 236 -> 113 us; in the op at 4 x 4096 x 16 heads of 128, bf16,
# wy_fwd 380 -> 246 us, pre_intra_fwd 385 -> 253 us, forward+backward 3774 -> 3502 us. Its error
# against float64 stays near float32's rounding (4e-8) for random keys but reaches 1.4e-4 where one
# key repeats with b near 1 (entries near 1: the powers of N grow to thousands before they
# cancel); substitution stays at 1.5e-7. That is under the tf32 and 16-bit roundings (5e-4 and
# coarser) of every product that uses the inverse when the inputs are 16-bit, but not under
# float32's, so float32 inputs ("ieee") always substitute. Its 16 x 16 products run in float32
# ("ieee") either way: in tf32x3 (tensor cores, near float32) the inverse alone took 123-140 us
# instead of 113, and the step was level or slower (71d9dd2, taken out;
# benchmarks/results/inverse_precision_71d9dd2.json): it is not bound by its multiply-adds.
INVERSE = dict(doubling=True)

# Float32 inputs multiply exactly ("ieee"): tl.dot then runs without tensor cores, its operands
# and products in registers, and the launches above, measured in bf16, spill. At 8 x 2048 x 16
# heads of 128 on an H200 the op took 51.7 ms forward and 146.7 ms forward+backward
# (benchmarks/results/sweep23_c9ca4bb.json; bf16: 0.78 and 2.2 ms), out_fwd alone 20.7 ms. So
# at head dims up to `max_head_dim` these settings replace the tables' (`_chunk_launch`; on a CUDA
# device `_scan_launch` for the state scans with float32 storage, BV halved while the programs
# fill less than `fill` of the SMs). Each per-chunk kernel's is the fastest of tile 16/32/64 x
# 2/4/8 warps, all kernels alike in each process (benchmarks/results/sweep24_c9ca4bb.json; tile 16
# at 8 warps left out, where pre_intra_bwd faults in bf16), GPU time in one forward+backward,
# table -> this, in us:
#   wy_bwd 35544 -> 2934, out_fwd 20726 -> 1985, wy_fwd 17514 -> 900, out_bwd 16972 -> 1146,
#   state_grads 7379 -> 3987, kb 3696 -> 274, pre_y 2489 -> 114, pre_out_fwd 1722 -> 149
# The state scans, with those (benchmarks/results/sweep25_c9ca4bb.json; the table gave BV 32,
# prefetching, 4 warps): the forward 17896 -> 2171 us pipelined 2 deep in 16-row slices (3391 in
# whole chunks, 12051-15239 in 32-row slices), the backward 20726 -> 6467 at 8 warps (8645 at BV 16
# and 4 warps, 18034-30936 pipelined). Together: forward 51.7 -> 5.7 ms, forward+backward 146.7 ->
# 22.1 ms, the same sums of outputs and gradients. With BV kept at 32 below 33 (batch, head) pairs
# (fill 0; benchmarks/results/sweep26_0af3afb.json), 1 x 16384's scans took 5641 and 9039 us, at
# BV 16 (fill 0.75) 2177 and 7463 (at 4 warps the backward's 11457). Against the tables' settings,
# forward and forward+backward in ms (sweep26, fill 0.75):
#   1 x 16384: 74.7 -> 28.0, 164.0 -> 59.7      2 x 8192: 69.2 -> 24.1, 155.1 -> 54.3
#   4 x 4096:  61.0 -> 6.5,  158.6 -> 22.6      8 x 2048: 50.9 -> 5.7,  144.5 -> 22.2
# Below `PHASE1["min_scans"]` phase 1 had kept chunks of 64, its scans beside their chunks' making,
# and its float32 kernels there took most of the rest: at 1 x 16384 the overlapped forward launch
# 18.6 ms, pre_intra_bwd 12.9, pre_out_fwd 4.7. So with `phase1_split` float32's phase 1 runs in
# chunks of 32 at any number of scans, never overlapped (`_phase1_chunk`; overlapped in chunks of
# 32 that launch took 12.9 ms), and pre_intra_fwd, pre_out_bwd and pre_intra_bwd, unswept until
# then, launch at 2 warps, tile 32: the fastest of 1/2/4 warps x tile 16/32/64 over the three rows
# below (benchmarks/results/sweep27_736557f.json, same method; at 1 x 16384 1232 -> 551, 324 ->
# 246 and 582 -> 515 us against `PHASE1["launch"]`'s). Forward and forward+backward in ms:
#   1 x 16384: 28.1 -> 5.9, 59.7 -> 25.3      2 x 8192: 23.9 -> 6.3, 54.0 -> 23.7
#   8 x 2048 (in chunks of 32 before too):   5.7 -> 5.6, 22.2 -> 21.8
# Phase 1's split backward scan then runs at 4 warps (`PHASE1["launch"]`'s 2 were measured in
# bf16): at 16, 32, 64 and 128 pairs 1551 / 790 / 403 / 210 us at 2 warps, 635 / 328 / 173 / 102
# at 4, 902 / 453 / 228 / 116 at 8, 6355 / 3226 / 1620 / 818 at 1 (benchmarks/results/
# sweep28_86d7466.json, same method). The forward scan's table warps (4) stay: 500 / 261 / 142 /
# 76 us, against 609-925 at 1 x 16384 with 2 or 8, 7817 with 1.
# Float32 inputs where torch runs float32 matmuls in TF32 (`utils.dot_precision`) multiply in tf32
# with float32 storage: phase 1 as here (`_float32_launch`), phase 2's per-chunk kernels and the
# state scans at `TF32_LAUNCH`'s (below; until 51eaeae at the tables'). At IEEE_LAUNCH's scans,
# the backward scan at BV 16 and 8 warps computed wrong gradients in tf32 (dS0 off by 0.66-0.91
# at K = V = 128) or faulted (K = 100, V = 48; benchmarks/results/scans_check_tf32_{h16,h4}_
# 811156d.json: Triton 3.6, H200), correct at 4 warps or BV 32. The tables' scans were as fast or
# faster (sweep30_811156d.json). GPU time,
# forward+backward in ms, exact products -> these (sweep30_{811156d,01b7a3a}.json; relative errors
# of the output and gradients against exact products 2.0e-3 to 2.9e-3; the op checks at float16's
# tolerance, kernels_check_float32_tf32_01b7a3a.json: 50/50, worst 4.6e-3):
#   1 x 16384: 24.2 -> 8.0    2 x 8192: 23.2 -> 7.1    4 x 4096: 21.3 -> 5.9    8 x 2048: 21.6 -> 5.9
# and with `TF32_LAUNCH` (sweep30_42f2af9.json): 7.2, 5.5, 4.6 and 4.5.
IEEE_LAUNCH = dict(
    max_head_dim=128,
    chunk=dict(
        out_fwd=dict(num_warps=4, tile=32),
        wy_fwd=dict(num_warps=2, tile=16),
        kb=dict(num_warps=8, tile=64),
        out_bwd=dict(num_warps=4, tile=16),
        state_grads=dict(num_warps=2, tile=16),
        wy_bwd=dict(num_warps=4, tile=16),
        pre_y=dict(num_warps=2, tile=32),
        pre_out_fwd=dict(num_warps=2, tile=32),
        pre_intra_fwd=dict(num_warps=2, tile=32),
        pre_out_bwd=dict(num_warps=2, tile=32),
        pre_intra_bwd=dict(num_warps=2, tile=32),
    ),
    state_fwd=dict(BV=32, fill=0.75, settings=dict(BS=16, num_warps=4, num_stages=2, PREFETCH=False)),
    state_bwd=dict(BV=32, fill=0.75, settings=dict(num_warps=8, num_stages=1, PREFETCH=True)),  # whole chunks
    phase1_split=True,
    precond_bwd=dict(split_num_warps=4),  # in chunks of 32
)
# Float32 storage with tf32 products (float32 inputs under torch's TF32) at head dims up to
# `IEEE_LAUNCH["max_head_dim"]`: until 51eaeae its per-chunk kernels and state scans took the
# tables' settings, never measured in tf32. Each variant in a process of its own, GPU time in one
# forward+backward, 3 rounds, medians (H200, H = 16, K = V = 128; outputs and gradients against
# the tables' within tf32's rounding, up to 6e-4).
# The state scans (benchmarks/results/sweep3{1,2}_51eaeae.json, 20 launches of each): BV from 64,
# halved (down to 16) while the programs fill less than `fill` of the SMs, 4 warps, Triton
# pipelining the loop over chunks, the forward in row slices of `slice` elements (BS = slice / BV),
# the backward in whole chunks. Forward scan (both calls) and backward scan, the tables' -> these,
# in us:
#   1 x 16384 (BV 16): 1773 -> the same launch, 1609 -> 1228
#   2 x 8192 (BV 32):  1792 -> 1168, 1322 -> 694
#   4 x 4096 (BV 64):  1171 -> 756,   983 -> 490
#   8 x 2048 (BV 64):  1295 -> 791,  1048 -> 513
# Prefetching was slower at every size but for the backward at 8 x 2048 (492 us, BV 64), and so
# were 2 or 8 warps. In tf32 the backward scan at BV 16 and 8 warps is miscompiled pipelined too
# (dK, dV off by 1.5-2.4; Triton 3.6), and the forward at BV 16, 8 warps, 3 deep ran in the one
# launch that faulted (illegal memory access; the backward beside it was BV 32, 3 deep). The
# backward 3 deep at BV 64 needs 245760 bytes of shared memory, more than an H200 has.
# The per-chunk kernels (benchmarks/results/sweep33_737c347.json; every kernel at one (tile,
# warps) in each process, 16/32/64 x 2/4/8 but 16 at 8): phase 2's at tile 32, the tables' ->
# these at 4 x 4096 in us (1 x 16384 within 4 us):
#   wy_fwd 338 -> 293 (2 warps), out_bwd 463 -> 280, state_grads 610 -> 491, wy_bwd 579 -> 529
# The other kernels keep the tables' (out_fwd, kb, and phase 1's at `PHASE1["launch"]`'s), the
# fastest or within 5 us.
TF32_LAUNCH = dict(
    chunk=dict(
        wy_fwd=dict(num_warps=2, tile=32),
        out_bwd=dict(num_warps=4, tile=32),
        state_grads=dict(num_warps=4, tile=32),
        wy_bwd=dict(num_warps=4, tile=32),
    ),
    state_fwd=dict(BV=64, fill=0.75, slice=1024, settings=dict(num_warps=4, num_stages=3, PREFETCH=False)),
    state_bwd=dict(BV=64, fill=0.75, settings=dict(num_warps=4, num_stages=2, PREFETCH=False)),
)


# The dtype of the `[B, H, NC, C, K]` gradient pieces that one backward kernel writes and a later
# one reads (phase 1: dK's direct part and dU, which the scan adds to; phase 2: dKb and dW's
# shares from the states): "storage", the chunked tensors' dtype (16 bits for 16-bit inputs, as
# fla keeps its dk and dw between kernels), or "float32". Each piece is summed in float32 inside
# a kernel and rounded where it is stored (dU twice: the scan adds its share to it). Measured in
# the whole forward+backward (H200, bf16, H=16, K=V=128;
# benchmarks/results/kernels_grad_storage_60434f8.json), float32 -> storage:
#   1 x 16384: 3801 -> 3665 us, peak 1324 -> 1196 MiB;  2 x 8192: 3321 -> 3178, 1327 -> 1199
#   4 x 4096: 3087 -> 2947, 1333 -> 1205;  8 x 2048: 3064 -> 2933, 1345 -> 1217
# (phase 2's pieces alone: 72-74 us of it). For float32 inputs both settings are the same.
GRAD_STORAGE = dict(phase1="storage", phase2="storage")

# Phase 1's chunks: phase 2's split in two (a view of the same layout; `chunk`) where it runs at
# least `min_scans` (batch, head) scans, after the kernels that make their chunks (not overlapped:
# `_overlap_workers`). Its per-chunk kernels then do half the C x C work a token (U U^T, the
# inverse, Y) on [32, 32] tiles, and its two scans take twice the steps over the same data. (Its
# output step took 64 rows a program, two chunks of 32, before eb29181.) Against chunks of 64,
# GPU time in one process (H200, bf16, H = 16, K = V = 128;
# benchmarks/results/phase1_chunk32_9d53791.json):
#   8 x 2048 (128 scans): forward 915 -> 838 us, forward+backward 2535 -> 2467
#   4 x 4096 (64 scans):  forward 948 -> 892 us, forward+backward 2640 -> 2624
#   3 x 4096 (48 scans):  forward 783 -> 751 us, forward+backward 2210 -> 2225 (so 64 and up then)
# (pre_intra_fwd 252 -> 146 us, pre_y 71 -> 49, pre_intra_bwd 259 -> 222; the scans 57 + 66 ->
# 77 + 96 us at 8 x 2048, 99 + 122 -> 140 + 181 at 4 x 4096; the output step 68 + 178 -> 76 + 214.)
# Where the scans run beside the chunks' making, they bound that launch: 2 x 8192 took 992 -> 1239
# us forward, 1 x 16384 1136 -> 1629 (phase1_chunk32_d8ce7ef.json).
#
# `launch`: what replaces CHUNK_LAUNCH's settings for phase 1's kernels in chunks of 32 (and the
# warps of its split backward scan, SCAN_TUNING["precond_bwd"]["split_num_warps"]), whose tables
# were measured at 64. Per kernel, GPU time in one forward+backward, in one process, the settings
# interleaved over 3 rounds (H200, bf16, H = 16, K = V = 128; benchmarks/results/
# c32launch{,2,3}_8ee26e0.json, pwarps_8ee26e0.json), table -> this, at 8 x 2048 and 4 x 4096:
#   pre_intra_bwd (1 warp):          222 -> 132 us, 222 -> 132 (2 warps: 203; 1 warp at tile 16: 171)
#   pre_out_bwd (2 warps, tile 16):  215 -> 201, 214 -> 202 (64-row programs; 2 warps at 32: 209)
#   pre_y (2 warps, tile 128):       50 -> 41, 50 -> 41
#   pre_intra_fwd (1 warp, tile 64): 148 -> 142, 147 -> 142
#   the backward scan (2 warps):     96 -> 89, 181 -> 163 (the forward scan at 2 warps: 77 -> 105)
# The output step then ran 64 rows a program, two chunks of 32 (pre_out_bwd at 4 warps in 32-row
# programs had taken 323 us, d8ce7ef). In 32-row programs at 1 warp it takes about half
# (benchmarks/results/sweep18_c32_d295546.json, same method; 64-row programs at the settings
# above -> 32-row ones at these), at 8 x 2048 and 4 x 4096:
#   pre_out_fwd (1 warp, tile 64):   76 -> 60, 76 -> 60 (2 warps at 32: 64; 1 warp at 32: 62)
#   pre_out_bwd (1 warp, tile 16):  202 -> 108, 201 -> 108 (1 warp at 32: 117; 2 warps at 16: 147)
#   forward+backward -4.2% and -3.5% (at pre_out_fwd 2 warps, tile 32; the split backward scan
#   there at the table's warps, not 2: 89 -> 97 and 165 -> 182 us).
PHASE1 = dict(
    chunk=32,
    # From 34 scans (was 64): on an H200 (132 SMs) phase 1's scans run beside their chunks' making
    # up to 33 (`_overlap_workers`). Since eb29181, chunks of 32 pay below 64 too: GPU time in one
    # process, chunks of 64 -> 32 (benchmarks/results/sweep18_{c64b,ms}_eb29181.json; bf16, K = V =
    # 128), forward+backward 937 -> 911 us at 9 x 2048 x 4 heads (36 scans), 1872 -> 1784 at
    # 5 x 4096 x 8 (40), 1752 -> 1688 at 3 x 4096 x 12 (36), 582 -> 556 at 11 x 1024 x 4 (44),
    # 2136 -> 2017 at 3 x 4096 x 16 (48); forward level to -6%. At 34 and 35, chunks of 64 (not
    # overlapped there) -> 32 (benchmarks/results/sweep48_775c306.json): forward+backward 898 -> 866
    # us at 17 x 2048 x 2 heads (34), 913 -> 883 at 5 x 2048 x 7 (35), 1714 -> 1648 at 7 x 4096 x 5
    # (35), 1692 -> 1628 at 2 x 4096 x 17 (34); forward 327 -> 319, 331 -> 326, 628 -> 606, 616 -> 594.
    # At 256 and 512 scans these settings and `read_inverse` stay the fastest: forward+backward at
    # 16 x 2048, 32 x 1024 and 32 x 2048, 4241 / 4208 / 8222 us, against 4648 / 4681 / 9153 in
    # chunks of 64, 4506 / 4467 / 8747 with 2 warps where `launch` has one, 4292 / 4275 / 8338
    # reading Y (benchmarks/results/sweep22_c9ca4bb.json).
    min_scans=34,
    launch=dict(
        pre_intra_fwd=dict(num_warps=1, tile=64),
        pre_y=dict(num_warps=2, tile=128),
        pre_out_fwd=dict(num_warps=1, tile=64),
        pre_out_bwd=dict(num_warps=1, tile=16),
        pre_intra_bwd=dict(num_warps=1),
        precond_bwd=dict(split_num_warps=2),
    ),
)


def launch_settings() -> dict:
    """A copy of the kernels' launch tables as they stand, for results to record what they ran
    (deep: the tables nest dicts, e.g. `PHASE1["launch"]`, `SCAN_TUNING[...]["fit"]`)."""
    tables = dict(
        scans=SCAN_TUNING,
        chunk=CHUNK_LAUNCH,
        inverse=INVERSE,
        grad_storage=GRAD_STORAGE,
        phase1=PHASE1,
        ieee=IEEE_LAUNCH,
        tf32=TF32_LAUNCH,
    )
    return copy.deepcopy(tables)
