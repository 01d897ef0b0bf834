"""The throughput suite behind `meld-dali bench` (imported as meld_dali.bench)."""
