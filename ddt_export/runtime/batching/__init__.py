"""Step-level serving: the scheduler (who runs this iteration), the model runner (the graph calls), the engine
that drives both one iteration at a time, and its simulator (a virtual clock and a cost curve)."""
