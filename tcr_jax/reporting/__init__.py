"""What a sweep's records become: BD-rates and RD plots (rd), the paper's
claims checked (poster), preview images (previews), the trivial references
(references) and the comparison of seeds (seeds).
"""
