"""GRPO recipes on TRL for thinking-with-images policies, with the zoom tools in the loop (``qzoom-agent grpo``).

Modules: `config` (the recipe's settings, parsed with TRL's parser), `data` (rows), `environments` (zoom, crop,
none), `rewards` (TRL reward functions), `processor` (rollouts tokenised as the agent loop renders them),
`evaluate` (held-out `compare` runs and the progress plot), `gpu` (where a recipe can run), `recipe` (the trainer
and the command). See docs/grpo.md.
"""
