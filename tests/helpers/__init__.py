"""Builders the tests share; test modules import from here (or get fixtures from conftest.py), never from each other.

networks   tiny network configs: the UNet of each architecture, the VAE, the text encoders
schedules  SD's noise schedule and the spec's sampler timesteps
parity     comparing a Flax twin with its PyTorch original; random PyTorch networks
pipelines  tiny random SD pipelines, converted models, prepared data and training WORKDIRs on disk
training   a tiny SD model, parameters and batch ready for the training step
data       random images in, prepared examples out
recipes    loading configs/*.py
processes  code run on several simulated devices, or as several joined processes
"""
