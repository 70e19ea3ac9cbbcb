"""Clients of remote rollout and teacher servers, and how they route around lost replicas."""
