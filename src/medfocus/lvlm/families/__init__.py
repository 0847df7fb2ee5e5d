"""Family adapters: qwen_vl, gemma3, llava."""
