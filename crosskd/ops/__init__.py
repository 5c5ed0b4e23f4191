"""Box geometry, priors (anchors, points) and box coders shared by heads, assigners and losses."""
