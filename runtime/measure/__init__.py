"""The runtime's measuring wing: perplexity and KL against a reference (evaluate.py), method-by-method comparison
tables (compare.py, compare_report.py), speed and memory benchmarks (bench.py, bench_model.py, bench_worker.py,
membw.py). It may call the converter; the engine side never imports it."""
