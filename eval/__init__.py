"""Evaluation: MMLU through lm-eval (`python -m eval.mmlu`) and MT-Bench-style judging (`python -m eval.mt_bench`)."""
