"""Plans: the plan as a versioned JSON contract, its independent verifier, its text form,
and the classic strategies as plans. Above the problem and the cost model; below the
solvers, which produce plans."""
