"""Executors: the devices that run what the engine schedules (see base.py for the contract)."""
