"""Model classes XTuner configs import from ``xtuner.model.transformers_models``, served by transformers."""
