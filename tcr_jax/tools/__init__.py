"""What runs on a trained workdir: the coder (`tcr-jax compress` /
`decompress`, compression), the depth head's ceiling (ceiling), the
V-information probes (probe, v_information) and the side information's
measurement (side_information).
"""
