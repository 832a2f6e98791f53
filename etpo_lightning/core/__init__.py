"""The plumbing every algorithm here shares, one job per file.

* ``base_module.py``  ``TokenRLModule``: model set-up, manual optimisation, logging, FSDP
                      and checkpoint hooks, the hooks subclasses fill in;
* ``forwards.py``     ``TokenForwards``, its forwards over [prompt | action], output heads
                      applied only where actions are scored;
* ``state.py``        what a checkpoint adds to Lightning's: RNG states of every rank;
* ``distributed.py``  FSDP detection, loading on meta / rank 0, sharded gradient clipping,
                      generation and root set-up;
* ``networks.py``     calling networks the module did not build (compiled, wrapped, custom);
* ``rank_stats.py``   logged statistics combined over ranks (weighted means, max, min, sums);
* ``batch.py``        ``Transition`` and ``TransitionBatch``, what rollouts hand to training;
* ``models.py``       loading causal LMs and tokenizers;
* ``model_aliases.py`` short model names (``tiny-sklearn-coder``) that providers register;
* ``lora.py``         ``LoRAConfig``, the ``lora`` option of every module: its networks as
                      LoRA adapter views on one frozen base.
"""
