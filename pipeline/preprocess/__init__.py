"""Preprocess stage: plan target spacing and intensities, resample, window and cache arrays for training."""
