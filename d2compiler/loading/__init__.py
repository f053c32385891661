"""Loading models from every supported source (folders, hub ids, GGUF, safetensors, d2compiler outputs)."""
