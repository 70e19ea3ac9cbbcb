"""Generating responses: the engine interface and the in-process sampler."""
