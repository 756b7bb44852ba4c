"""Fine-tuning patched MoE models: Alpaca data, routing statistics during training, the SFT runner."""
