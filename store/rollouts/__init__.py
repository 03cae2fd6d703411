"""Canary rollouts: the model and judgement, their records, what each process serves."""
