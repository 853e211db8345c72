"""How bytes move between nodes: the Overlay interface and its libp2p and simulated implementations."""
