"""Trainer plug-ins: one file per method; the trainer itself names no method.
(The guide to adding one is written below once the protocol settles.)"""
