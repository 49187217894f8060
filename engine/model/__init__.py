"""Loading HF causal LMs (and peft adapters) frozen for attribution, and fingerprinting them."""
