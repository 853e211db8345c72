"""What a node decides: data, models, local training, averaging and the learning protocols.

Pure torch and numpy; imports nothing from ``overlay`` or ``node``.
"""
