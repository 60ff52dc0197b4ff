"""XTuner names with no lmtune component of their own: ``xtuner.parallel.sequence`` and
``xtuner.model.transformers_models``, as ``lmtune.config.aliases`` maps them."""
