"""Training: chat tokenization with response-only labels, and LoRA SFT."""
