"""labkit: the companion package of the course on distributed training of large models.

Every concept of the course is built here from scratch, small enough to read as part of the lecture,
and checked against PyTorch's own implementation. Start with :func:`labkit.launch`; every message the
lessons send goes through :mod:`labkit.comm`.

The map: lesson → module → the names a student uses.

Lecture code (a concept per file; read it beside its notebook)
    all       launcher          launch, WorkerError (N real processes from a notebook cell)
              comm              the one communication layer: send, recv, exchange, all_reduce, ...,
                                record() and CommEvent (what was sent, to whom, how many bytes)
              timeline          Event (what one rank did from start to end), busy_fraction, and
                                draw_timeline: the one drawing of a step (lessons 3, 5, 6)
              figures           RANK_COLORS, error_bars (what every lesson's figures share)
    1         data_parallel     shard_indices, average_gradients, server_average_gradients,
                                weighted_average_gradients, broadcast_parameters, LinearRegression
              local_sgd         average_parameters, averaging_gap (parameter vs gradient averaging)
              data_parallel_figures   shard_grid, draw_loss_curves, draw_loss_differences
              local_sgd_figures       draw_gap_vs_local_steps, draw_gap_curves
    2         ring              the ring as a schedule: reduce_scatter_rounds, all_gather_rounds,
                                chunk_bounds, simulate (direction=-1: the leftward ring, exercise 2c)
              collectives       reduce_scatter_phase, all_gather_phase (exercise 2), ring_all_reduce,
                                tree_all_reduce, naive_all_reduce, broadcast
              cost_model        the α–β model: predict, fit_alpha_beta, bus_bandwidth, ring_bytes_sent
              ring_figures      draw_ring_round, draw_ring_rounds, ring_legend
              cost_model_figures  bytes_per_rank_figure, alpha_beta_fit_figure, crossover_figure
    3         ddp               NaiveDDP, OverlapDDP, BucketedDDP (exercise 3 subclasses it), plan_buckets
              bucket_model      bucket_times, exposed, best_split (when each bucket is sent; exercise 3e)
              ddp_figures       draw_ddp_timeline, ddp_timeline_legend, ddp_timelines_figure, draw_loss_curve,
                                draw_wrapper_agreement, bucket_sweep_figure, scaling_figure
    4         optim             LARS, Lamb, AdaScale, scaled_lr, warmup_factor; lamb_sharded: whole_norms,
                                sharded_lamb_step (LAMB with ZeRO-1's sharded state, exercise 4c);
                                lamb_fused: fused_lamb_step (Lamb(fused=True): two passes, compiled)
              large_batch       one GPT at batch k·B: lr_multiplier, schedule, Data, train_run, mean_loss
              large_batch_sweep the sweep over methods and k: options, sweep, train, summary_table
              large_batch_figures   batch_sweep_figure, draw_batch_sweep, noise_scale_figure, warmup_figure,
                                    source_formula_figure, draw_trust_ratios, draw_weight_norms,
                                    trust_ratio_figure, adascale_gain_figure, adascale_sweep_gain_figure
    5         layer_split       partition, train_step, busy_fractions (the model cut over ranks, send/recv)
              layer_split_figures   draw_model_state_memory (why split: model states against a GPU),
                                    draw_layer_split, layer_split_legend
              tensor_parallel   ColumnParallelLinear, RowParallelLinear, the f/g operators,
                                ParallelMLP, count_communication
              tensor_parallel_gpt   ParallelSelfAttention, ParallelBlock, tensor_parallel_gpt,
                                    shard_like, grid_groups, VocabParallelEmbedding (exercise 5i)
              tensor_parallel_figures   draw_tp_mlp, draw_grid, c_attn_rows_figure, draw_tp_dp_traffic
    6         pipeline          schedules as data (gpipe, one_f_one_b, interleaved_1f1b), simulate,
                                bubble_fraction, run_schedule (the runtime: a plain interpreter; its
                                gloo speed-ups apart in pipeline.prefetch), gantt (the figures:
                                draw_gantt, gantt_stack, pipeline_figure, measured_figure,
                                draw_measured_bubble, draw_bubble_vs_m, activation_memory_figure,
                                draw_dp_pp_layout, explorer)
    7         param_server      shard_bounds, serve, work, train (sync, async, bounded staleness;
                                ssp_release is the bounded rule, release= takes another, exercise 7c)
              param_server_figures  draw_roles, draw_step, draw_stability_bounds, loss_curves_figure,
                                    staleness_figure, draw_divergence, draw_stability_sweep, traffic_figure
    8         memory            Setup, Memory, predict, num_parameters, activation_bytes, measure, step_flops,
                                recompute_blocks (full), recompute_attention (selective): where a step's bytes
                                go, predicted and measured to the byte
              mixed_precision   MasterWeights (fp32 master copy of a 16-bit model), LossScaler (torch.amp's
                                dynamic rule), underflow_fraction, update_survives
              zero              ZeroOptimizer (ZeRO stages 1 and 2: optimizer state and gradients split over
                                the ranks; reduce-scatter, update a chunk, all-gather; exercise 8a overrides shard
                                and step), bytes_sent_per_step (per-rank traffic of stages 0–3; exercise 8c)
              fsdp              FSDP (unit_class: exercise 8b sets its own Unit), Unit, gpt_units (ZeRO stage 3:
                                parameters sharded by unit, gathered for the unit's forward and backward, freed
                                after; prefetch optional)
              sharded_step      train: the GPT under DDP, ZeRO-1/2, FSDP or torch's counterparts, with each
                                rank's kept bytes, bytes sent and timeline (the lesson, the benchmark, tests)
              memory_figures    predicted_measured_figure, activations_figure, per_rank_figure,
                                fsdp_timeline_figure, calculator_figure, calculator (the widget)
    9         network           Link, Network, message_cost (the emulated network: comm.emulate(network))
              hierarchical      node_groups, hierarchical_all_reduce, hierarchical_seconds, flat_seconds
              bottleneck        step_time, threshold_tokens (compute + the messages the backward cannot hide)
              compression       cast_hook, topk_hook (exercise 9a), powersgd_hook and their states: DDP hooks
              compression_cost  topk_bytes, allreduce_bytes, break_even_ratio (when top-k pays; exercise 9b)
              ddp_hooks         HookedDDP (register_comm_hook, torch's interface), GradBucket
              compressed_training   train(method, ...): each remedy's loss, bytes and wall-clock per step
              compression_figures   curves_figure, allreduce_time_figure, threshold_figure, step_time_figure,
                                    explorer
    10        checkpoint        rng_state, set_rng_state, all_rng_states, save (always a whole file), load
                                (weights_only, clear errors), CheckpointError
              resumable         Trainer (state_dict / load_state_dict: what a resume needs), train (stop, resume,
                                compare bit for bit)
              sharded_checkpoint   save, load, full_state (torch.distributed.checkpoint: FSDP shards saved on
                                   N ranks, loaded on M)
              hangs             watch, beat, diagnose, explain (per-rank stack dumps of a hung job: which rank
                                is not in the collective, and where), scenario (loop, skip, mismatch),
                                late_at_barrier (monitored_barrier names a late rank)
              data_loading      SlowDataset, measure, predicted_seconds (a DataLoader's workers against the step)
              preflight         report, compare, run (what every rank sees, and what differs between them),
                                my_shard, shard_overlap (a sampler told the wrong rank)
              ecosystem         Tool, TOOLS, LESSONS (the tools of the field on the course's lessons);
                                ecosystem_figures.ecosystem_figure
    models    models            GPT, GPTConfig (the small GPT every lesson trains)
              speed             Switches: what the GPT lab turns on for speed (bf16, TF32, flash, compile,
                                fused AdamW), measured_matmul_flops, datasheet_peak_flops, peak memory
              text              load_corpus, CharTokenizer, TokenBlocks, distributed_loader (no download)
    Interactive figures: widgets.FigureExplorer (controls around a figure function; the PNG travels
    with the widget, so it also shows where the widget cannot run).
    Each concept's figures live beside it (<concept>_figures.py, pipeline/gantt.py): they import
    matplotlib, the concepts do not.

Infrastructure (not lecture code)
    collectives_support   the collectives' pre-flight check of a call, reused buffers, the trace recorder
    checks/               the exercises' checkers: checks/harness.py (mistakes as data, torch.distributed
                          watched on N ranks, deadlocks named) and one exNN.py per exercise, each a table
                          of known mistakes that its tests build too
    exercises             makes exercises/ from solutions/
    labs/                 command-line labs (thin: options, outputs) over the library, the same code under
                          labkit.launch, torchrun and accelerate
    bench/                benchmarks that print numbers (docs/results/ holds what they printed)
"""

from labkit.launcher import WorkerError, launch

__version__ = "0.1.0"
__all__ = ["launch", "WorkerError", "__version__"]
