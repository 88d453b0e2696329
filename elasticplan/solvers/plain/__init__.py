"""The plain program (a boolean per shard, bitwidth and placement), written once and
solver-neutrally, its integer scaling for CP-SAT, and the CP-SAT and CBC backends."""
