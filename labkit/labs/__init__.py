"""Lab scripts: the lessons' training runs as programs, for `python -m`, `torchrun` and `accelerate launch`.

    entry       how every lab starts: under torchrun/accelerate, or forking its own workers
    dp_sgd      lab 1: data-parallel SGD on linear regression, central server or all-reduce
    train_gpt   lab 3: a small GPT on a novel with torch's DDP or labkit's naive/overlap/bucketed DDP

Every lab runs the same worker code three ways:

    python -m labkit.labs.dp_sgd --world-size 4                     # labkit.launch forks 4 workers
    torchrun --nproc-per-node 4 -m labkit.labs.dp_sgd --world-size 4
    accelerate launch --config_file configs/accelerate/cpu.yaml -m labkit.labs.dp_sgd --world-size 4
"""
