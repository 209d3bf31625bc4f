"""Multi-process runs: engines (process groups, DeepSpeed checks, lost peers) and sharded weights
(one unwrap, one gather, one barrier; FSDP2 sharding and the full-model save).
"""
