"""Task families, each owning its items, prompts, scoring and reward: base.py (the Task interface),
math.py (GSM8K and the project's arithmetic problems), code.py (HumanEval and the project's small
functions, pass@k), multiple_choice.py (log-likelihood benchmarks in lm-eval's formats), docs_qa.py
(chats from crawled pages) and stage.py (the tasks stage). The tasks stage, RLVR and the eval use
the same families."""
