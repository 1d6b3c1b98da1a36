"""The demo workspace: a tiny trained base model, fine-tunes of it (full and LoRA), traps, merge plans, and
an exact-match evaluator (``mergescope demo``, ``mergescope eval``)."""
