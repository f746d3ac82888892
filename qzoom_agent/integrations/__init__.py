"""Bridges from qzoom-agent to outside evaluation frameworks.

Nothing in the core imports this package: each subpackage is imported by the framework it plugs into (through a
Python entry point or that framework's own plugin setting), and it may import that framework at module level.

* :mod:`qzoom_agent.integrations.lmms_eval`: the ``qzoom`` model of lmms-eval (``pip install qzoom-agent[lmms]``).
"""
