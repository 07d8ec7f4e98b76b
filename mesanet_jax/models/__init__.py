"""Language models: config and presets, the LM with prefill/decode, and generation."""
