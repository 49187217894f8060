"""Per-example gradient capture on tracked modules, projected without forming d_out x d_in gradients."""
