"""Generation engines: what samples the rollout's actions (see ``core.generation``)."""
