"""Training loops (pretraining, fine-tuning, translation). Filled by the training issues;
nothing here yet."""
