"""Physical ranges (docs/formats.md, "Limits and ranges"): values outside them are refused
at load, so that no solver ever sees a number it would misread. A leaf: the device and
model checks (elasticplan.problem.loader) and the question's (elasticplan.problem.question)
take their bounds from here. MB = 10**6 bytes."""

MIN_BANDWIDTH_MB_S = 1e-3  # 1 KB/s: slower overflows no time, but is no storage
MAX_BANDWIDTH_MB_S = 1e6  # 1 TB/s
MAX_LATENCY_US = 1e6  # one second per read request
MIN_GFLOPS = 1e-3
MAX_GFLOPS = 1e7  # 10 PFLOP/s
MAX_OVERHEAD_MS = 1e4
MIN_DEQUANT_GB_S = 1e-6
MAX_DEQUANT_GB_S = 1e4
MAX_NS_PER_WEIGHT = 1e6  # a millisecond per weight
MAX_QUANTILE = 0.999
MAX_CONTENTION_SHARE = 0.9  # compute slowed at most 10x while reads run beside it
MAX_SPREAD = 1.0  # a stage's relative spread (rms of log measured / predicted)
MAX_MEMORY_MB = 1e9  # 1 PB
MAX_SEQ_LEN = 1 << 20
MAX_PIECES = MAX_SEQ_LEN  # a streamed table read in pieces: at most one per row
MAX_LAYERS = 10_000
MAX_SHARDS_PER_LAYER = 10_000
MAX_VARIANTS = 500_000  # layers x shards x bitwidths: what the planner is sized for (docs)
MAX_FLOPS = 1e18
MAX_SHARD_BYTES = 1 << 40  # 1 TiB
MAX_IMPORTANCE = 1e6
MAX_TARGET_MS = 1e7
MAX_BUFFER_MB = MAX_MEMORY_MB


def bytes_of_mb(mb: float) -> int:
    """Whole bytes in `mb` MB (10**6 bytes each), robust to the float's last digit."""
    return int(mb * 1e6 + 1e-6)
