"""The load tool's parts (``bench/load.py`` is the command).

- :mod:`.check`: compares what the client had accepted, what the store holds and what the
  simulator delivered, message by message. Pure functions: the part a test must see fail.
- :mod:`.client`: the open-model load generator (constant arrival rate, bounded in-flight).
- :mod:`.faults`: the fault plan (what happens when) and the thread that carries it out.
- :mod:`.processes`: the simulator and relay subprocesses, the relay's config, the control API.
- :mod:`.report`: timelines, the JSON and Markdown reports and the stdout summary.
- :mod:`.plots`: the pictures (matplotlib, Agg backend, imported only when plotting).
"""
