"""scripts/bench_train.py's parts, one module per thing measured (throughput, overhead) and what they share."""
