"""The aggregated program (counts per cost class) as one sparse matrix, the search over it
(row generation, rounding, greedy fill), and the HiGHS backend that solves it."""
